// Drives kernelpool with the official TypeScript MCP SDK over streamable HTTP, as another
// implementation of the transport than the server's own Python SDK.
//
//   node client.mjs URL TOKEN NOTEBOOK     prints one JSON object on stdout
//
// Connects with the bearer header, lists the tools, creates NOTEBOOK with use_notebook, runs
// `1+1` with insert_execute_code_cell (on the session's active notebook: no `notebook` argument),
// and reports what came back. Exits 1 on any error.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const [url, token, notebook] = process.argv.slice(2);
if (!url || !token || !notebook) {
  console.error("usage: node client.mjs URL TOKEN NOTEBOOK");
  process.exit(2);
}

const transport = new StreamableHTTPClientTransport(new URL(url), {
  requestInit: { headers: { Authorization: `Bearer ${token}` } },
});
const client = new Client({ name: "kernelpool-node-test", version: "1.0.0" });
try {
  await client.connect(transport);
  const server = client.getServerVersion();
  const { tools } = await client.listTools();
  const opened = await client.callTool({ name: "use_notebook", arguments: { notebook, mode: "create" } });
  const ran = await client.callTool(
    { name: "insert_execute_code_cell", arguments: { cell_index: -1, cell_source: "1+1" } },
    undefined,
    { timeout: 120000 },
  );
  const report = {
    server,
    protocolVersion: transport.protocolVersion ?? null,
    sessionId: transport.sessionId ?? null,
    tools: tools.map((t) => t.name),
    useNotebook: { isError: opened.isError ?? false, structuredContent: opened.structuredContent ?? null },
    execute: {
      isError: ran.isError ?? false,
      text: ran.content.filter((c) => c.type === "text").map((c) => c.text),
      structuredContent: ran.structuredContent ?? null,
    },
  };
  console.log(JSON.stringify(report));
  await transport.terminateSession().catch(() => {});
  await client.close();
} catch (err) {
  console.error(err?.stack ?? String(err));
  process.exit(1);
}
