#!/usr/bin/env node
// A device application in Node.js, on the devtables agent's local API (standard library only).
//
// It raises a Fault (which the agent replicates to the cloud), reads it back, lists the
// device's faults a page at a time, follows the change stream (server-sent events) until its
// own fault shows up in it, then answers the commands the cloud sends to the device: `reboot`
// succeeds, anything else fails.
//
//   node examples/node/device_app.js --socket data/gw-1.sock
//   node examples/node/device_app.js --socket data/gw-1.sock --commands 1   # then exit
//
// The socket is the agent's `local_api.socket` (default: its database file with `.sock`).
'use strict';

const http = require('node:http');

function option(name, fallback) {
  const at = process.argv.indexOf(name);
  return at > 0 && at + 1 < process.argv.length ? process.argv[at + 1] : fallback;
}

const socketPath = option('--socket');
const commandsToAnswer = Number(option('--commands', '0'));
if (!socketPath) {
  console.error('usage: device_app.js --socket PATH [--commands N]');
  process.exit(2);
}

// One request over the Unix socket: resolves to {status, body} (the body decoded from JSON).
function call(method, path, body, query) {
  if (query) path += '?' + new URLSearchParams(query).toString();
  return new Promise((resolve, reject) => {
    const data = body === undefined ? undefined : JSON.stringify(body);
    const headers = data === undefined ? {} : { 'Content-Type': 'application/json' };
    const req = http.request({ socketPath, method, path, headers }, (res) => {
      let raw = '';
      res.setEncoding('utf8');
      res.on('data', (chunk) => { raw += chunk; });
      res.on('end', () => resolve({ status: res.statusCode, body: raw ? JSON.parse(raw) : null }));
    });
    req.on('error', reject);
    if (data !== undefined) req.write(data);
    req.end();
  });
}

// A request that must succeed: its JSON body (errors are {"error", "kind"}).
async function ok(method, path, body, query) {
  const { status, body: answer } = await call(method, path, body, query);
  if (status >= 300) throw new Error(`${method} ${path}: ${status} ${JSON.stringify(answer)}`);
  return answer;
}

// Follows GET /v1/changes as server-sent events from `cursor` until `stop(change)` is true.
// A client that reconnects sends the last id it saw as Last-Event-ID and misses nothing.
function followChanges(cursor, models, stop) {
  return new Promise((resolve, reject) => {
    const path = '/v1/changes?' + new URLSearchParams({ from: String(cursor), model: models });
    const req = http.request(
      { socketPath, path, headers: { Accept: 'text/event-stream' } },
      (res) => {
        if (res.statusCode !== 200) {
          reject(new Error(`changes: ${res.statusCode}`));
          return;
        }
        let buffer = '';
        res.setEncoding('utf8');
        res.on('data', (chunk) => {
          buffer += chunk;
          let end;
          while ((end = buffer.indexOf('\n\n')) >= 0) {
            const block = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            const event = { event: 'message', data: '' };
            for (const line of block.split('\n')) {
              if (line.startsWith(':')) continue; // keep-alive comment
              const colon = line.indexOf(':');
              const field = colon < 0 ? line : line.slice(0, colon);
              const value = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
              if (field === 'data') event.data += value;
              else event[field] = value;
            }
            if (event.event === 'change') {
              const change = JSON.parse(event.data);
              console.log(`change ${change.seq}: ${change.op} ${change.model} from ${change.origin}`);
              if (stop(change)) {
                req.destroy();
                resolve(change.seq);
                return;
              }
            } else if (event.event === 'gone' || event.event === 'error') {
              req.destroy();
              reject(new Error(`changes: ${event.data}`));
              return;
            }
          }
        });
      },
    );
    req.on('error', reject);
    req.end();
  });
}

async function main() {
  const status = await ok('GET', '/v1/status');
  const device = status.device.split('/')[1];
  const cursor = status.local_api.changes.latest;
  console.log(`agent ${status.device}: ready=${status.ready} pending=${status.pending}`);

  // Write: the fault is durable on the device when this returns, and goes to the cloud.
  const fault = (await ok('POST', '/v1/items/Fault', {
    deviceId: device, severity: 'warn', message: 'raised by the node example',
  })).item;
  console.log(`raised fault ${fault.id}`);

  // Read it back by its key fields.
  const got = (await ok('GET', '/v1/items/Fault/one', undefined,
    { where: JSON.stringify({ deviceId: device, id: fault.id }) })).item;
  if (got.message !== fault.message) throw new Error(`read back ${JSON.stringify(got)}`);

  // Find, two at a time: pass `next` back until it is null.
  let pages = 0;
  let total = 0;
  let next = null;
  do {
    const query = { where: JSON.stringify({ deviceId: device }), limit: '2' };
    if (next) query.next = next;
    const page = await ok('GET', '/v1/items/Fault', undefined, query);
    pages += 1;
    total += page.items.length;
    next = page.next;
  } while (next);
  console.log(`${total} faults in ${pages} pages`);

  // Follow the changes from the cursor read at the start: our own fault is in the stream,
  // although it was written before the stream opened.
  await followChanges(cursor, 'Fault', (change) => change.item.id === fault.id);

  // Commands: take one (long-poll), do it, answer. Unanswered, it is offered again after its
  // lease; answered, the result replicates to the cloud.
  let answered = 0;
  while (commandsToAnswer === 0 || answered < commandsToAnswer) {
    const { status: code, body: command } = await call('GET', '/v1/commands/next', undefined, { wait: '30' });
    if (code === 204) continue;
    if (code !== 200) throw new Error(`commands/next: ${code} ${JSON.stringify(command)}`);
    console.log(`command ${command.command} args=${JSON.stringify(command.args)}`);
    const answer = command.command === 'reboot'
      ? { result: { rebooted: true, by: 'node' } }
      : { error: `this app does not know ${command.command}` };
    await ok('POST', `/v1/commands/${command.id}/result`, answer);
    answered += 1;
  }
  console.log('done');
}

main().catch((e) => {
  console.error(e.message || e);
  process.exit(1);
});
