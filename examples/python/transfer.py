#!/usr/bin/env python3
"""Publish one transfer command to transfer-worker and wait for its outcome, both ways.

Every event received for the command is printed on stdout as one JSON line,
{"via": "reply_to" | "results", "event": {...}}. Exit status 0 once the terminal event has
arrived both ways; 2 on a timeout or a broker error, with the reason on stderr.
"""
import argparse
import json
import os
import sys
import time
import uuid

import pika

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2f"
TERMINAL = ("transfer.succeeded", "transfer.failed", "transfer.rejected", "transfer.expired")


def fail(message):
    print(message, file=sys.stderr)
    sys.exit(2)


def options():
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # The broker options default to the worker's own variables, so one shell can run both.
    p.add_argument("--url", default=env("TRANSFER__AMQP__URL", DEFAULT_URL))
    p.add_argument("--commands-queue",
                   default=env("TRANSFER__AMQP__COMMANDS_QUEUE", "transfer.commands"))
    p.add_argument("--results-exchange",
                   default=env("TRANSFER__AMQP__RESULTS_EXCHANGE", "transfer.results"))
    p.add_argument("--org-id", required=True)
    p.add_argument("--session-id", default=uuid.uuid4().hex, help="botSessionId (default: new)")
    p.add_argument("--stream-id", help="the bot (default: the worker's only or default bot)")
    p.add_argument("--command-id", default=f"py-{uuid.uuid4()}")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--agent", help="aId: transfer to this agent")
    target.add_argument("--queue", help="queueId: transfer to this queue")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait in all")
    return p.parse_args()


def main():
    args = options()
    deadline = time.monotonic() + args.timeout
    command_id = args.command_id
    command = {"commandId": command_id, "orgId": args.org_id, "botSessionId": args.session_id}
    if args.stream_id:
        command["streamId"] = args.stream_id
    if args.agent:
        command["aId"] = args.agent
    else:
        command.update(transferredType="QUEUE", queueId=args.queue)

    params = pika.URLParameters(args.url)
    # Bound every wait on the network: connecting, a broker that stops answering (missed
    # heartbeats close the connection), and a broker that blocks publishers (memory, disk).
    params.connection_attempts = 1
    params.socket_timeout = params.blocked_connection_timeout = min(args.timeout, 10)
    params.heartbeat = 5
    connection = pika.BlockingConnection(params)
    channel = connection.channel()

    # The two ways an outcome comes back, both set up before publishing so nothing is missed.
    # (a) reply_to: a queue of our own that the worker answers on directly; it gets only this
    #     command's terminal event, and vanishes with our connection.
    reply_queue = channel.queue_declare("", exclusive=True).method.queue
    # (b) the results exchange: every event of every command, for any system that follows
    #     outcomes (also of commands it did not publish). A private queue bound with the
    #     terminal events' routing keys; we keep only our commandId.
    results_queue = channel.queue_declare("", exclusive=True).method.queue
    for routing_key in TERMINAL:
        channel.queue_bind(results_queue, args.results_exchange, routing_key=routing_key)

    arrived = {}

    def consume(queue, via, ours):
        def on_message(_channel, _method, properties, body):
            event = json.loads(body)
            if ours(properties, event):
                print(json.dumps({"via": via, "event": event}), flush=True)
                if event.get("event") in TERMINAL:
                    arrived[via] = event

        channel.basic_consume(queue, on_message, auto_ack=True)

    consume(reply_queue, "reply_to", lambda props, _: props.correlation_id == command_id)
    consume(results_queue, "results", lambda _, event: event.get("commandId") == command_id)

    # Publisher confirms: basic_publish returns only once the broker has the command safely
    # (and raises if it refuses it); mandatory: it raises too if no queue took the command,
    # e.g. no worker ever declared the commands queue. Persistent (delivery_mode 2): the
    # broker keeps it on disk, so a broker restart before the worker acks cannot lose it.
    channel.confirm_delivery()
    try:
        channel.basic_publish(
            exchange="",  # the default exchange: the routing key is the queue's name
            routing_key=args.commands_queue,
            body=json.dumps(command).encode(),
            properties=pika.BasicProperties(
                content_type="application/json",
                delivery_mode=pika.DeliveryMode.Persistent,
                message_id=command_id,  # the idempotency key, should the body lack commandId
                correlation_id=command_id,  # so the reply can be matched to this command
                reply_to=reply_queue,
                timestamp=int(time.time()),  # with the worker's commands.max_age, a deadline
            ),
            mandatory=True,
        )
    except pika.exceptions.UnroutableError:
        fail(f"no queue named {args.commands_queue} took the command: is the worker running?")
    print(f"published {command_id} to {args.commands_queue}", file=sys.stderr)

    while len(arrived) < 2:
        left = deadline - time.monotonic()
        if left <= 0:
            missing = sorted({"reply_to", "results"} - arrived.keys())
            fail(f"timeout: no terminal event for {command_id} via {' and '.join(missing)} "
                 f"in {args.timeout:g}s")
        connection.process_data_events(time_limit=min(left, 1))
    connection.close()


if __name__ == "__main__":
    try:
        main()
    except pika.exceptions.AMQPError as error:
        fail(f"broker error: {error!r}")
