// Loaded with `node --import` into the conformance runner, which sends no credentials of its
// own (0.1.12 has no option for them): adds `Authorization: Bearer $KERNELPOOL_TOKEN` to every
// HTTP request to the origin of $KERNELPOOL_CONFORMANCE_URL, and to no other. Works through
// undici's global dispatcher, which both Node's fetch (the TS SDK's transport) and undici's own
// `request` (the DNS-rebinding scenario) use. Headers already set are left alone.
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const { Agent, setGlobalDispatcher } = require("undici");

const token = process.env.KERNELPOOL_TOKEN;
const target = new URL(process.env.KERNELPOOL_CONFORMANCE_URL).origin;
if (!token) throw new Error("auth-preload: KERNELPOOL_TOKEN is not set");

function* pairs(list) {
  for (let i = 0; i < list.length; i += 2) yield [list[i], list[i + 1]];
}

const withAuth = (dispatch) => (opts, handler) => {
  if (opts.origin && new URL(String(opts.origin)).origin !== target) return dispatch(opts, handler);
  const given = opts.headers ?? {};
  const headers = Array.isArray(given) ? Object.fromEntries(pairs(given)) : { ...given };
  if (!Object.keys(headers).some((k) => k.toLowerCase() === "authorization")) {
    headers.authorization = `Bearer ${token}`;
  }
  return dispatch({ ...opts, headers }, handler);
};

setGlobalDispatcher(new Agent().compose(withAuth));
