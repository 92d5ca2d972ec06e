// The official TypeScript SDK's own OAuth client against kernelpool:
//
//   node oauth-client.mjs URL BROWSER_COMMAND [CLIENT_METADATA_URL]     prints one JSON object
//
// Connects with no token, follows the 401 through discovery, registers by DCR (or, given
// CLIENT_METADATA_URL, uses it as a CIMD client id), hands the authorization URL to
// BROWSER_COMMAND (tests/oauth_browser.py: headless Chromium signs in and allows), receives the
// code on its own loopback callback server, finishes the flow, then lists the tools and runs
// `1+1`. Exits 1 on any error.
import { spawn } from "node:child_process";
import http from "node:http";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { UnauthorizedError } from "@modelcontextprotocol/sdk/client/auth.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const [url, browserCommand, metadataUrl] = process.argv.slice(2);
const callback = http.createServer();
await new Promise((resolve) => callback.listen(0, "127.0.0.1", resolve));
const redirectUrl = `http://127.0.0.1:${callback.address().port}/callback`;
const answered = new Promise((resolve) => {
  callback.on("request", (req, res) => {
    res.end("done; you may close this window");
    resolve(new URL(req.url, redirectUrl).searchParams);
  });
});

let info, tokens, verifier;
const provider = {
  get redirectUrl() { return redirectUrl; },
  get clientMetadata() {
    return {
      client_name: "kernelpool test (TypeScript SDK)", redirect_uris: [redirectUrl], response_types: ["code"],
      grant_types: ["authorization_code", "refresh_token"], token_endpoint_auth_method: "none",
    };
  },
  clientMetadataUrl: metadataUrl || undefined,
  clientInformation: () => info,
  saveClientInformation: (i) => { info = i; },
  tokens: () => tokens,
  saveTokens: (t) => { tokens = t; },
  saveCodeVerifier: (v) => { verifier = v; },
  codeVerifier: () => verifier,
  redirectToAuthorization: (authorizationUrl) => {
    spawn(browserCommand, [authorizationUrl.toString()], { stdio: ["ignore", "ignore", "inherit"] });
  },
};

const client = new Client({ name: "kernelpool-oauth-test", version: "1.0.0" });
try {
  let transport = new StreamableHTTPClientTransport(new URL(url), { authProvider: provider });
  try {
    await client.connect(transport);
    throw new Error("connected without signing in");
  } catch (err) {
    if (!(err instanceof UnauthorizedError)) throw err;
  }
  const params = await answered;
  await transport.finishAuth(params.get("code"));
  transport = new StreamableHTTPClientTransport(new URL(url), { authProvider: provider });
  await client.connect(transport);
  const { tools } = await client.listTools();
  await client.callTool({ name: "use_notebook", arguments: { notebook: "ts-oauth.ipynb", mode: "create" } });
  const ran = await client.callTool({ name: "execute_code", arguments: { notebook: "ts-oauth.ipynb", code: "1+1" } },
    undefined, { timeout: 120000 });
  console.log(JSON.stringify({
    clientId: info?.client_id ?? null, iss: params.get("iss"), tokenPrefix: tokens?.access_token?.slice(0, 3) ?? null,
    hasRefresh: Boolean(tokens?.refresh_token), tools: tools.map((t) => t.name),
    execute: { isError: ran.isError ?? false, text: ran.content.filter((c) => c.type === "text").map((c) => c.text) },
  }));
  await client.close();
  callback.close();
} catch (err) {
  console.error(err?.stack ?? String(err));
  process.exit(1);
}
