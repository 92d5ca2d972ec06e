// A real OpenID Connect provider for tests/test_oidc.py: panva's oidc-provider (certified by the
// OpenID Foundation), on loopback over plain HTTP, issuer http://localhost:PORT.
//
// Its configuration comes as JSON in KP_OIDC: {port, clients: [{client_id, client_secret,
// redirect_uris}], accounts: {id: {password, claims}}}. The provider's own side of the sign-in
// (the login form) is this script's minimal page: an account name and its password; the consent
// is granted for the scopes asked. ID tokens carry the claims of the granted scopes, as
// Keycloak, Google and Entra ID do (conformIdTokenClaims off); PKCE is required of every client,
// so a relying party that does not send it fails. Prints one JSON line {issuer} once listening.

import crypto from 'node:crypto';
import http from 'node:http';

import Provider from 'oidc-provider';

const config = JSON.parse(process.env.KP_OIDC);
const issuer = `http://localhost:${config.port}`;
const accounts = config.accounts;

const key = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ format: 'jwk' });

const provider = new Provider(issuer, {
  clients: config.clients.map((c) => ({
    ...c, grant_types: ['authorization_code'], response_types: ['code'], token_endpoint_auth_method: 'client_secret_basic',
  })),
  jwks: { keys: [{ ...key, kid: 'test-key-1', use: 'sig', alg: 'RS256' }] },
  cookies: { keys: [crypto.randomBytes(32).toString('hex')] },
  claims: {
    openid: ['sub'], email: ['email', 'email_verified'], profile: ['preferred_username', 'name'], groups: ['groups'],
  },
  conformIdTokenClaims: false,
  features: { devInteractions: { enabled: false } },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  pkce: { required: () => true },
  // the subject differs from the login name: kernelpool must take the user from the claims
  async findAccount(ctx, sub) {
    const account = accounts[sub.replace(/^sub-/, '')];
    if (!account) return undefined;
    return { accountId: sub, claims: async () => ({ sub, ...account.claims }) };
  },
});

function escape(text) {
  return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function loginPage(res, uid, error) {
  res.writeHead(error ? 401 : 200, { 'Content-Type': 'text/html; charset=utf-8' });
  res.end(`<!doctype html><title>Test provider sign-in</title><h1>Test provider</h1>
${error ? `<p role="alert">${escape(error)}</p>` : ''}
<form method="post" action="/interaction/${escape(uid)}">
<label>Account <input name="login"></label>
<label>Password <input name="password" type="password"></label>
<button type="submit">Log in</button>
</form>`);
}

async function readForm(req) {
  let body = '';
  for await (const chunk of req) body += chunk;
  return Object.fromEntries(new URLSearchParams(body));
}

async function interaction(req, res) {
  const details = await provider.interactionDetails(req, res);
  if (req.method === 'GET') {
    loginPage(res, details.uid, null);
    return;
  }
  const form = await readForm(req);
  const account = accounts[form.login];
  if (!account || account.password !== form.password) {
    loginPage(res, details.uid, 'Wrong account or password.');
    return;
  }
  const accountId = `sub-${form.login}`;
  const grant = new provider.Grant({ accountId, clientId: details.params.client_id });
  grant.addOIDCScope(details.params.scope);
  const grantId = await grant.save();
  await provider.interactionFinished(req, res, { login: { accountId }, consent: { grantId } },
    { mergeWithLastSubmission: false });
}

const callback = provider.callback();
const server = http.createServer((req, res) => {
  if (req.url.startsWith('/interaction/')) {
    interaction(req, res).catch((err) => {
      res.writeHead(400, { 'Content-Type': 'text/plain' });
      res.end(`interaction failed: ${err.message}`);
    });
    return;
  }
  callback(req, res);
});
server.listen(config.port, '127.0.0.1', () => {
  process.stdout.write(`${JSON.stringify({ issuer })}\n`);
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
