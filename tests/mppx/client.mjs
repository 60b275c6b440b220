// The reference MPP client (npm `mppx`) against a running gateway, for tests/test_mpp_mppx.py.
//
//   node client.mjs parse <url> <secret>   read a 402's Payment challenges, check their HMAC ids
//   node client.mjs pay <url> <key> <token name> <token version>
//                                          pay the `evm` charge with mppx's own client, stream
//
// Prints one JSON object on stdout; the Python test asserts on it.
import { Challenge, Receipt } from 'mppx'
import { Mppx, evm } from 'mppx/client'
import { privateKeyToAccount } from 'viem/accounts'

const BODY = JSON.stringify({
  model: 'exact', stream: true, max_tokens: 5,
  messages: [{ role: 'user', content: 'hi' }],
})
const INIT = { method: 'POST', headers: { 'content-type': 'application/json' }, body: BODY }

async function parse(url, secret) {
  const response = await fetch(url, INIT)
  const challenges = Challenge.fromResponseList(response).map((c) => ({
    id: c.id, realm: c.realm, method: c.method, intent: c.intent, expires: c.expires,
    request: c.request, verified: Challenge.verify(c, { secretKey: secret }),
    tampered: Challenge.verify({ ...c, realm: `${c.realm}.evil` }, { secretKey: secret }),
  }))
  // The client's preferences (Accept-Payment, as mppx writes it): only what it accepts.
  const preferred = await fetch(url, {
    ...INIT, headers: { ...INIT.headers, 'accept-payment': 'evm/session, evm/charge;q=0.5' } })
  const ordered = Challenge.fromResponseList(preferred).map((c) => c.intent)
  const narrowed = await fetch(url, {
    ...INIT, headers: { ...INIT.headers, 'accept-payment': 'evm/charge' } })
  return { status: response.status, contentType: response.headers.get('content-type'),
    body: await response.json(), challenges, ordered,
    narrowed: Challenge.fromResponseList(narrowed).map((c) => c.intent) }
}

async function pay(url, key, name, version) {
  const account = privateKeyToAccount(key)
  const sent = []
  const mppx = Mppx.create({
    polyfill: false,
    methods: [evm.charge({ account, authorization: { name, version } })],
    fetch: async (input, init) => {
      sent.push(new Headers(init?.headers ?? {}).get('accept-payment'))
      return fetch(input, init)
    },
  })
  const response = await mppx.fetch(url, INIT)
  const text = await response.text()
  const receipt = response.headers.get('payment-receipt')
  return { status: response.status, payer: account.address, acceptPayment: sent,
    apiKey: response.headers.get('tollstream-api-key'),
    receipt: receipt ? Receipt.deserialize(receipt) : null, body: text }
}

const [mode, ...args] = process.argv.slice(2)
const result = mode === 'parse' ? await parse(...args) : await pay(...args)
process.stdout.write(JSON.stringify(result))
