-- streamwise-outbox schema, version 1: the outbox and the inbox.
--
-- Applied by `streamwise_outbox::migrate` (which records it in streamwise_outbox_schema), or
-- by hand / by your own migration tool: every statement is idempotent.

-- One row per message published through the outbox, written in the application's own
-- transaction. The relay sends unsent rows of a topic in `id` order and sets `sent_at`;
-- sent rows are deleted after the relay's retention.
CREATE TABLE IF NOT EXISTS streamwise_outbox (
    id           bigserial   PRIMARY KEY,
    -- The topic (stream) the relay publishes the message to.
    topic        text        NOT NULL,
    -- The message's UUID (also inside `message`): the same on every send of the row, so an
    -- inbox downstream removes a duplicate sent after a relay crash.
    message_uuid uuid        NOT NULL,
    -- The message in streamwise's wire format: a JSON object of the codec's fields
    -- (event_type, payload as JSON text, metadata as JSON text when not empty, timestamp,
    -- uuid), every value a string.
    message      jsonb       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    sent_at      timestamptz
);

-- What the relay reads: the unsent rows of a topic in order, and the topics that have some.
CREATE INDEX IF NOT EXISTS streamwise_outbox_unsent
    ON streamwise_outbox (topic, id) WHERE sent_at IS NULL;

-- What the retention cleanup deletes.
CREATE INDEX IF NOT EXISTS streamwise_outbox_sent
    ON streamwise_outbox (sent_at) WHERE sent_at IS NOT NULL;

-- One row per message whose handler committed, per consumer (by default the consumer
-- group), written in the handler's transaction.
CREATE TABLE IF NOT EXISTS streamwise_inbox (
    consumer     text        NOT NULL,
    message_uuid uuid        NOT NULL,
    handled_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_uuid)
);

-- What `purge_inbox` deletes by age.
CREATE INDEX IF NOT EXISTS streamwise_inbox_handled_at ON streamwise_inbox (handled_at);
