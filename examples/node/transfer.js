#!/usr/bin/env node
// Publish one transfer command to transfer-worker and wait for its outcome, both ways.
//
// Every event received for the command is printed on stdout as one JSON line,
// {"via": "reply_to" | "results", "event": {...}}. Exit status 0 once the terminal event has
// arrived both ways; 2 on a timeout or a broker error, with the reason on stderr.
import { randomUUID } from 'node:crypto';
import { parseArgs } from 'node:util';
import amqp from 'amqplib';

const TERMINAL = ['transfer.succeeded', 'transfer.failed', 'transfer.rejected', 'transfer.expired'];
const USAGE = `usage: transfer.js --org-id ID (--agent AID | --queue QUEUEID) [--session-id ID]
  [--stream-id ID] [--command-id ID] [--timeout SECONDS] [--url AMQP_URL]
  [--commands-queue NAME] [--results-exchange NAME]`;

function fail(message) {
  console.error(message);
  process.exit(2);
}

const env = process.env;
const string = (fallback) => ({ type: 'string', default: fallback });
let opt;
try {
  ({ values: opt } = parseArgs({
    options: {
      // The broker options default to the worker's own variables, so one shell can run both.
      url: string(env.TRANSFER__AMQP__URL ?? 'amqp://guest:guest@127.0.0.1:5672/%2f'),
      'commands-queue': string(env.TRANSFER__AMQP__COMMANDS_QUEUE ?? 'transfer.commands'),
      'results-exchange': string(env.TRANSFER__AMQP__RESULTS_EXCHANGE ?? 'transfer.results'),
      'org-id': { type: 'string' },
      'session-id': string(randomUUID().replaceAll('-', '')),
      'stream-id': { type: 'string' },
      'command-id': string(`js-${randomUUID()}`),
      agent: { type: 'string' },
      queue: { type: 'string' },
      timeout: string('30'),
    },
  }));
} catch (error) {
  fail(`${error.message}\n${USAGE}`);
}
const timeout = Number(opt.timeout);
if (!opt['org-id'] || !opt.agent === !opt.queue || !(timeout > 0)) fail(USAGE);

const commandId = opt['command-id'];
const command = { commandId, orgId: opt['org-id'], botSessionId: opt['session-id'] };
if (opt['stream-id']) command.streamId = opt['stream-id'];
if (opt.agent) command.aId = opt.agent;
else Object.assign(command, { transferredType: 'QUEUE', queueId: opt.queue });

// One deadline bounds every wait on the network: connecting, confirms, and the outcome.
const arrived = new Map();
const timer = setTimeout(() => {
  const missing = ['reply_to', 'results'].filter((via) => !arrived.has(via));
  fail(`timeout: no terminal event for ${commandId} via ${missing.join(' and ')} in ${timeout}s`);
}, timeout * 1000);

async function main() {
  const connection = await amqp.connect(opt.url, { timeout: Math.min(timeout, 10) * 1000 });
  connection.on('error', (error) => fail(`broker error: ${error.message}`));
  const channel = await connection.createConfirmChannel();
  channel.on('error', (error) => fail(`broker error: ${error.message}`));
  let returned = false;
  channel.on('return', () => { returned = true; });

  // The two ways an outcome comes back, both set up before publishing so nothing is missed.
  // (a) reply_to: a queue of our own that the worker answers on directly; it gets only this
  //     command's terminal event, and vanishes with our connection.
  const { queue: replyQueue } = await channel.assertQueue('', { exclusive: true });
  // (b) the results exchange: every event of every command, for any system that follows
  //     outcomes (also of commands it did not publish). A private queue bound with the
  //     terminal events' routing keys; we keep only our commandId.
  const { queue: resultsQueue } = await channel.assertQueue('', { exclusive: true });
  for (const key of TERMINAL) await channel.bindQueue(resultsQueue, opt['results-exchange'], key);

  let bothArrived;
  const done = new Promise((resolve) => { bothArrived = resolve; });
  async function consume(queue, via, ours) {
    await channel.consume(queue, (message) => {
      const event = JSON.parse(message.content.toString());
      if (!ours(message.properties, event)) return;
      console.log(JSON.stringify({ via, event }));
      if (TERMINAL.includes(event.event)) arrived.set(via, event);
      if (arrived.size === 2) bothArrived();
    }, { noAck: true });
  }
  await consume(replyQueue, 'reply_to', (props) => props.correlationId === commandId);
  await consume(resultsQueue, 'results', (_, event) => event.commandId === commandId);

  // Publisher confirms: waitForConfirms resolves only once the broker has the command safely
  // (and rejects if it refuses it); mandatory: the broker returns it if no queue took it, e.g.
  // no worker ever declared the commands queue. Persistent (delivery mode 2): the broker keeps
  // it on disk, so a broker restart before the worker acks cannot lose it.
  channel.sendToQueue(opt['commands-queue'], Buffer.from(JSON.stringify(command)), {
    persistent: true,
    contentType: 'application/json',
    messageId: commandId, // the idempotency key, should the body lack commandId
    correlationId: commandId, // so the reply can be matched to this command
    replyTo: replyQueue,
    timestamp: Math.floor(Date.now() / 1000), // with the worker's commands.max_age, a deadline
    mandatory: true,
  });
  await channel.waitForConfirms();
  const queue = opt['commands-queue'];
  if (returned) fail(`no queue named ${queue} took the command: is the worker running?`);
  console.error(`published ${commandId} to ${queue}`);

  await done;
  clearTimeout(timer);
  await connection.close();
}

// A failed broker operation (refused connection, missing exchange, ...) ends the run.
main().catch((error) => fail(`broker error: ${error.message}`));
