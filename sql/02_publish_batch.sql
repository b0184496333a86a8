--
-- 02_publish_batch: ids in input order, dedupe inside the batch and against
-- earlier events, bad members and elements, empty array, NULL.
--
SELECT eventbox.subscribe('t02', event_types => '{t02.*}', start_at => 'now');
SELECT test.last_id() AS base \gset

-- every member; the ids come back in input order and increase
SELECT ord, id - :base AS id
FROM eventbox.publish_batch('[
	{"event_type": "t02.a", "payload": {"n": 1}},
	{"event_type": "t02.b", "payload": {"n": 2}, "aggregate_type": "order", "aggregate_id": "7",
	 "headers": {"h": 1}, "dedupe_key": "t02-k1", "deliver_at": "2000-01-01 00:00:00+00"},
	{"event_type": "t02.c"},
	{"event_type": "t02.d", "payload": null, "headers": null, "aggregate_type": null,
	 "aggregate_id": null, "dedupe_key": null, "deliver_at": null}
]') WITH ORDINALITY AS b(id, ord);
SELECT id - :base AS id, event_type, aggregate_type, aggregate_id, payload, headers,
	   dedupe_key, deliver_at = '2000-01-01 00:00:00+00' AS deliver_at_2000
FROM eventbox.log WHERE id > :base ORDER BY id;
-- one transaction, one occurred_at, distinct UUIDv7 event ids in id order
SELECT count(DISTINCT occurred_at) AS times, count(DISTINCT txid) AS transactions,
	   count(DISTINCT event_id) AS event_ids,
	   array_agg(id ORDER BY id) = array_agg(id ORDER BY event_id) AS same_order
FROM eventbox.log WHERE id > :base;

-- a big batch keeps input order too
SELECT test.last_id() AS base2 \gset
SELECT count(*) AS n,
	   bool_and(id - :base2 = ord) AS ids_in_input_order
FROM eventbox.publish_batch(
	(SELECT jsonb_agg(jsonb_build_object('event_type', 't02.bulk', 'payload',
										 jsonb_build_object('i', i)) ORDER BY i)
	 FROM generate_series(1, 1000) i)) WITH ORDINALITY AS b(id, ord);
SELECT bool_and((payload->>'i')::int = id - :base2) AS payload_matches_id
FROM eventbox.log WHERE id > :base2;

-- dedupe inside the batch: a repeated key returns the first event's id and
-- writes nothing; also a key repeated after another duplicate
SELECT test.last_id() AS base3 \gset
SELECT ord, id - :base3 AS id
FROM eventbox.publish_batch('[
	{"event_type": "t02.dup", "dedupe_key": "t02-k2", "payload": {"v": "first"}},
	{"event_type": "t02.dup", "payload": {"v": "no key"}},
	{"event_type": "t02.dup", "dedupe_key": "t02-k2", "payload": {"v": "second"}},
	{"event_type": "t02.dup", "dedupe_key": "t02-k3", "payload": {"v": "other key"}},
	{"event_type": "t02.dup", "dedupe_key": "t02-k2", "payload": {"v": "third"}}
]') WITH ORDINALITY AS b(id, ord);
SELECT id - :base3 AS id, payload->>'v' AS v, dedupe_key
FROM eventbox.log WHERE id > :base3 ORDER BY id;

-- dedupe against earlier events: t02-k1 was published by the first batch
SELECT test.last_id() AS base4 \gset
SELECT ord, id - :base AS id_from_first_batch
FROM eventbox.publish_batch('[
	{"event_type": "t02.again", "dedupe_key": "t02-k1"},
	{"event_type": "t02.new"},
	{"event_type": "t02.again", "dedupe_key": "t02-k1"}
]') WITH ORDINALITY AS b(id, ord);
SELECT id - :base4 AS id, event_type FROM eventbox.log WHERE id > :base4 ORDER BY id;
-- and a single publish with a key used in a batch
SELECT eventbox.publish('t02.single', dedupe_key => 't02-k3') - :base3 AS id;

-- an empty array publishes nothing and returns no rows
SELECT count(*) FROM eventbox.publish_batch('[]');

-- the subscription gets each event once, in input order
SELECT count(*) AS delivered, count(DISTINCT id) AS distinct_ids,
	   array_agg(id ORDER BY id) = array_agg(id) AS in_order
FROM eventbox.claim_batch(10000, 't02');

-- errors: nothing of a failing batch is written, not even the good members
SELECT test.last_id() AS base5 \gset
SELECT test.expect_error($$SELECT eventbox.publish_batch(NULL)$$);
SELECT test.expect_error($$SELECT eventbox.publish_batch('{"event_type": "t02.x"}')$$);
SELECT test.expect_error($$SELECT eventbox.publish_batch('"t02.x"')$$);
SELECT test.expect_error($$SELECT eventbox.publish_batch('[{"event_type": "t02.ok"}, "t02.x"]')$$);
SELECT test.expect_error($$SELECT eventbox.publish_batch('[{"event_type": "t02.ok"}, 42]')$$);
SELECT test.expect_error($$SELECT eventbox.publish_batch('[{"event_type": "t02.ok"}, null]')$$);
SELECT test.expect_error($$SELECT eventbox.publish_batch('[{"event_type": "t02.ok"}, [{"event_type": "t02.x"}]]')$$);
-- unknown members are errors (a typo must not drop data)
SELECT test.expect_error($$SELECT eventbox.publish_batch('[{"event_type": "t02.ok"}, {"event_type": "t02.x", "paylod": {}}]')$$);
SELECT test.expect_error($$SELECT eventbox.publish_batch('[{"event_type": "t02.x", "id": 5}]')$$);
-- members of the wrong JSON type
SELECT test.expect_error($$SELECT eventbox.publish_batch('[{"event_type": 5}]')$$);
SELECT test.expect_error($$SELECT eventbox.publish_batch('[{"event_type": "t02.x", "payload": [1]}]')$$);
SELECT test.expect_error($$SELECT eventbox.publish_batch('[{"event_type": "t02.x", "payload": "s"}]')$$);
SELECT test.expect_error($$SELECT eventbox.publish_batch('[{"event_type": "t02.x", "headers": 1}]')$$);
SELECT test.expect_error($$SELECT eventbox.publish_batch('[{"event_type": "t02.x", "aggregate_type": "o", "aggregate_id": 7}]')$$);
SELECT test.expect_error($$SELECT eventbox.publish_batch('[{"event_type": "t02.x", "dedupe_key": true}]')$$);
SELECT test.expect_error($$SELECT eventbox.publish_batch('[{"event_type": "t02.x", "deliver_at": "not a time"}]')$$);
-- the contract applies to each member
SELECT test.expect_error($$SELECT eventbox.publish_batch('[{"payload": {}}]')$$);
SELECT test.expect_error($$SELECT eventbox.publish_batch('[{"event_type": null}]')$$);
SELECT test.expect_error($$SELECT eventbox.publish_batch('[{"event_type": "t02.ok"}, {"event_type": ""}]')$$);
SELECT test.expect_error($$SELECT eventbox.publish_batch('[{"event_type": "t02.ok"}, {"event_type": "t02..x"}]')$$);
SELECT test.expect_error($$SELECT eventbox.publish_batch('[{"event_type": "t02.x", "aggregate_type": "o"}]')$$);
SELECT test.expect_error($$SELECT eventbox.publish_batch('[{"event_type": "t02.x", "aggregate_id": "1"}]')$$);
-- nothing was written by any of them
SELECT test.last_id() - :base5 AS ids_used, count(*) AS rows_written
FROM eventbox.log WHERE id > :base5;
SELECT count(*) FROM eventbox.claim_batch(10, 't02');

SELECT eventbox.unsubscribe('t02');

-- an element that fails its checks is named in the error's context
SELECT eventbox.publish_batch('[{"event_type": "t02.ok"}, {"event_type": "t02.bad", "aggregate_type": "o", "aggregate_id": ""}]');
