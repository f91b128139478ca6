// node-oidc-provider (https://github.com/panva/node-oidc-provider), configured for the
// tests and started by tests/idp/__init__.py (IndependentServer) on loopback. Everything that answers a
// token, discovery or JWKS request is oidc-provider's own code; this file only
// configures it (clients, keys, resource server, mTLS certificate lookup) and adds two
// test-only routes under /_test/: mint a refresh token (no browser login in a test)
// and rotate the signing keys.
//
// argv[2]: a JSON file {tls: {cert, key, ca} | null, jwks: {keys: [...]}, clients: [...],
//                       resource, resources, scope, access_token_ttl}
// stdout: one JSON line {"issuer": ...} once listening. It exits when stdin closes (the
// test process is gone) or on SIGTERM.
import fs from 'node:fs';
import http from 'node:http';
import https from 'node:https';

import Provider from 'oidc-provider';

const settings = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));

function pem(raw) {
  return `-----BEGIN CERTIFICATE-----\n${raw.toString('base64').match(/.{1,64}/g).join('\n')}\n-----END CERTIFICATE-----\n`;
}

function configuration(jwks) {
  return {
    clients: settings.clients,
    jwks,
    findAccount: async (ctx, id) => ({ accountId: id, claims: async () => ({ sub: id }) }),
    scopes: ['openid', 'offline_access', ...settings.scope.split(' ')],
    rotateRefreshToken: true,
    clientAuthMethods: [
      'none', 'client_secret_basic', 'client_secret_post', 'client_secret_jwt', 'private_key_jwt',
      ...(settings.tls ? ['tls_client_auth'] : []),
    ],
    clockTolerance: 5,
    ttl: { ClientCredentials: settings.access_token_ttl, AccessToken: settings.access_token_ttl },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: async () => settings.resource,
        useGrantedResource: async () => true,
        getResourceServerInfo: async (ctx, resource) => {
          if (!settings.resources.includes(resource)) throw new Error(`unknown resource ${resource}`);
          return {
            scope: settings.scope,
            audience: resource,
            accessTokenTTL: settings.access_token_ttl,
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg: 'RS256' } },
          };
        },
      },
      mTLS: {
        enabled: Boolean(settings.tls),
        tlsClientAuth: Boolean(settings.tls),
        certificateBoundAccessTokens: Boolean(settings.tls),
        getCertificate: (ctx) => {
          const peer = ctx.req.socket.getPeerCertificate?.(false);
          return peer && peer.raw ? pem(peer.raw) : undefined;
        },
        certificateAuthorized: (ctx) => ctx.req.socket.authorized === true,
        certificateSubjectMatches: (ctx, property, expected) => {
          if (property !== 'tls_client_auth_subject_dn') return false;
          const peer = ctx.req.socket.getPeerCertificate(false);
          return Boolean(peer && peer.subject && `CN=${peer.subject.CN}` === expected);
        },
      },
    },
  };
}

let provider;
let callback;
let issuer;

function build(jwks) {
  provider = new Provider(issuer, configuration(jwks));
  provider.on('server_error', (ctx, err) => console.error('server_error', err));
  callback = provider.callback();
}

async function readJson(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return JSON.parse(Buffer.concat(chunks).toString('utf8') || '{}');
}

async function testRoute(req, res) {
  const body = await readJson(req);
  if (req.url === '/_test/refresh_token') {
    const client = await provider.Client.find(body.client_id);
    const grant = new provider.Grant({ accountId: 'user-1', clientId: client.clientId });
    grant.addOIDCScope('offline_access');
    grant.addResourceScope(settings.resource, settings.scope);
    const grantId = await grant.save();
    const token = new provider.RefreshToken({
      accountId: 'user-1',
      client,
      grantId,
      gty: 'authorization_code',
      scope: `offline_access ${settings.scope}`,
      resource: settings.resource,
    });
    return { refresh_token: await token.save() };
  }
  if (req.url === '/_test/rotate') {
    build(body.jwks);
    return {};
  }
  throw new Error(`no such test route ${req.url}`);
}

async function handle(req, res) {
  if (req.url.startsWith('/_test/') && req.method === 'POST') {
    try {
      const answer = await testRoute(req, res);
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify(answer));
    } catch (err) {
      res.writeHead(500, { 'content-type': 'text/plain' });
      res.end(String(err));
    }
    return;
  }
  callback(req, res);
}

const server = settings.tls
  ? https.createServer({
    cert: settings.tls.cert,
    key: settings.tls.key,
    ca: settings.tls.ca,
    requestCert: true,
    rejectUnauthorized: false,
  }, handle)
  : http.createServer(handle);

server.listen(0, '127.0.0.1', () => {
  const { port } = server.address();
  issuer = `${settings.tls ? 'https' : 'http'}://127.0.0.1:${port}`;
  build(settings.jwks);
  process.stdout.write(`${JSON.stringify({ issuer })}\n`);
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => server.close(() => process.exit(0)));
}
process.stdin.on('end', () => process.exit(0));
process.stdin.resume();
