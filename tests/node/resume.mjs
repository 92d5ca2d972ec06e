// Runs one long cell with the official TypeScript MCP SDK while the test cuts the TCP connection
// (through a proxy it controls): the SDK's transport reconnects with Last-Event-ID on its own.
//
//   node resume.mjs URL TOKEN NOTEBOOK CODE
//
// Prints {"calling": true} on a line of its own when the long call is about to start (the test
// then cuts the connection), then one JSON object with the call's result and how many progress
// notifications arrived. Exits 1 on any error.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const [url, token, notebook, code] = process.argv.slice(2);
if (!url || !token || !notebook || !code) {
  console.error("usage: node resume.mjs URL TOKEN NOTEBOOK CODE");
  process.exit(2);
}

const transport = new StreamableHTTPClientTransport(new URL(url), {
  requestInit: { headers: { Authorization: `Bearer ${token}` } },
});
const client = new Client({ name: "kernelpool-node-resume", version: "1.0.0" });
const errors = [];
transport.onerror = (err) => errors.push(String(err));
try {
  await client.connect(transport);
  await client.callTool({ name: "use_notebook", arguments: { notebook, mode: "create" } });
  let progress = 0;
  console.log(JSON.stringify({ calling: true }));
  const ran = await client.callTool(
    { name: "insert_execute_code_cell", arguments: { notebook, cell_index: -1, cell_source: code } },
    undefined,
    { timeout: 120000, onprogress: () => { progress += 1; } },
  );
  console.log(JSON.stringify({
    execute: {
      isError: ran.isError ?? false,
      text: ran.content.filter((c) => c.type === "text").map((c) => c.text),
      structuredContent: ran.structuredContent ?? null,
    },
    progress,
    transportErrors: errors,
  }));
  await transport.terminateSession().catch(() => {});
  await client.close();
} catch (err) {
  console.error(err?.stack ?? String(err), JSON.stringify(errors));
  process.exit(1);
}
