// Call a runner server's /execute through oRPC's RPC client, as the upstream TypeScript
// orchestrator does (packages/orchestrator/orchestrator/src/steps/remote-step.ts in the
// `runners` project, which pins @orpc/client 1.11.3): `new RPCLink({ url })`, then
// `client.execute(payload)`.
//
// Usage: node orpc_execute.mjs RUNNER_URL PAYLOAD_JSON   (after `npm ci` in this folder)
// Prints one JSON line, what that orchestrator reads: {"ok": true, "output": ...} or
// {"ok": false, "error": {"code", "status", "defined", "message", "data"}}.
import { createORPCClient } from "@orpc/client";
import { RPCLink } from "@orpc/client/fetch";

const [url, payload] = process.argv.slice(2);
const client = createORPCClient(new RPCLink({ url }));
try {
  const output = await client.execute(JSON.parse(payload));
  console.log(JSON.stringify({ ok: true, output: output ?? null }));
} catch (error) {
  const { message, code, status, defined, data } = error;
  console.log(JSON.stringify({ ok: false, error: { code, status, defined, message, data } }));
}
