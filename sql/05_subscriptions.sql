--
-- 05_subscriptions: subscribe, patterns, alter_subscription, pause/resume,
-- unsubscribe, start_at, bad input.
--
-- every argument
SELECT eventbox.subscribe('t05_full', event_types => '{t05.a.*,t05.b}', mode => 'pull',
						  channel => 't05_chan', notify => 'envelope', ordering => 'aggregate',
						  lease => '2 minutes', max_attempts => 3, backoff_base => '5 seconds',
						  backoff_max => '10 minutes', start_at => 'beginning');
-- positional, the defaults, and the other modes
SELECT eventbox.subscribe('t05_pos', '{t05.*}', 'pull', 't05_pos_chan', 'none', 'none',
						  '10 seconds', 1, '0', '0', 'now');
SELECT eventbox.subscribe('t05_defaults');
SELECT eventbox.subscribe('t05_push', mode => 'push');
SELECT eventbox.subscribe('t05_once', mode => 'push_once', notify => 'wakeup');
-- names may use letters, digits, _ . : - (up to 63 bytes)
SELECT eventbox.subscribe('t05_Name.with:all-chars_0');
SELECT eventbox.subscribe('t05_' || repeat('x', 59));
SELECT name, event_types, mode, channel, notify, ordering, lanes, lease, max_attempts,
	   backoff_base, backoff_max, paused
FROM eventbox.subscriptions WHERE name LIKE 't05%' ORDER BY name;
-- each lane of a subscription has a cursor
SELECT s.name, count(c.*) AS cursors
FROM eventbox.subscriptions s LEFT JOIN eventbox.cursors c USING (sub_id)
WHERE s.name LIKE 't05%' GROUP BY 1 ORDER BY 1;

-- glob patterns: * is any run of characters (dots too), ? one character
SELECT eventbox.subscribe('t05_g_star', event_types => '{t05g.order.*}');
SELECT eventbox.subscribe('t05_g_mid', event_types => '{t05g.*.created}');
SELECT eventbox.subscribe('t05_g_q', event_types => '{t05g.order.v?}');
SELECT eventbox.subscribe('t05_g_exact', event_types => '{t05g.order}');
SELECT eventbox.subscribe('t05_g_list', event_types => '{t05g.user.*,t05g.order.v1}');
SELECT eventbox.subscribe('t05_g_chars', event_types => '{t05g.x-y:z_*}');
SELECT eventbox.subscribe('t05_g_all', event_types => '{t05g.nothing,*}');
SELECT test.last_id() AS base \gset
SELECT count(*) FROM eventbox.publish_batch('[
	{"event_type": "t05g.order"},
	{"event_type": "t05g.order.created"},
	{"event_type": "t05g.order.item.created"},
	{"event_type": "t05g.order.v1"},
	{"event_type": "t05g.order.v12"},
	{"event_type": "t05g.user.created"},
	{"event_type": "t05g.orderXcreated"},
	{"event_type": "t05g.x-y:z_w"},
	{"event_type": "T05G.ORDER.CREATED"}
]');
SELECT s.name, array_agg(d.event_type ORDER BY d.id) AS matched
FROM (VALUES ('t05_g_star'), ('t05_g_mid'), ('t05_g_q'), ('t05_g_exact'), ('t05_g_list'),
			 ('t05_g_chars'), ('t05_g_all')) s(name)
	 LEFT JOIN LATERAL eventbox.claim_batch(100, s.name) d ON true
GROUP BY 1 ORDER BY 1;

-- start_at: 'now' does not see events committed before subscribe,
-- 'beginning' sees all retained events
SELECT eventbox.publish('t05s.before') - :base AS id;
SELECT eventbox.subscribe('t05_now', event_types => '{t05s.*}', start_at => 'now');
SELECT eventbox.subscribe('t05_beginning', event_types => '{t05s.*}', start_at => 'beginning');
SELECT eventbox.subscribe('t05_default_start', event_types => '{t05s.*}');
SELECT eventbox.publish('t05s.after') - :base AS id;
SELECT s.name, array_agg(d.event_type ORDER BY d.id) AS got
FROM (VALUES ('t05_now'), ('t05_beginning'), ('t05_default_start')) s(name)
	 LEFT JOIN LATERAL eventbox.claim_batch(100, s.name) d ON true
GROUP BY 1 ORDER BY 1;
-- 'now' with a transaction still open at subscribe time: its event is
-- committed after the subscription started, so the subscription gets it
SELECT eventbox.subscribe('t05_open', event_types => '{t05o.*}');
SELECT eventbox.publish('t05o.one') - :base AS id;
SELECT event_type FROM eventbox.claim_batch(10, 't05_open');

-- alter_subscription: change patterns, lease, attempts, backoff, channel
SELECT eventbox.alter_subscription('t05_g_exact', event_types => '{t05a.*}', lease => '1 minute',
								   max_attempts => 7, backoff_base => '2 seconds',
								   backoff_max => '2 minutes', channel => 't05_new_chan',
								   notify => 'none');
SELECT name, event_types, mode, channel, notify, lease, max_attempts, backoff_base, backoff_max
FROM eventbox.subscriptions WHERE name = 't05_g_exact';
SELECT eventbox.publish('t05a.x') - :base AS id;
SELECT eventbox.publish('t05g.order') - :base AS id;
SELECT event_type FROM eventbox.claim_batch(10, 't05_g_exact');
-- arguments left out keep their values; the ordering may be given unchanged
SELECT eventbox.alter_subscription('t05_g_exact', ordering => 'none');
SELECT name, event_types, channel, notify, lease, max_attempts
FROM eventbox.subscriptions WHERE name = 't05_g_exact';
-- changing the mode resets notify to the new mode's default unless given
SELECT eventbox.alter_subscription('t05_defaults', mode => 'push');
SELECT name, mode, notify FROM eventbox.subscriptions WHERE name = 't05_defaults';
SELECT eventbox.alter_subscription('t05_defaults', mode => 'pull', notify => 'none');
SELECT name, mode, notify FROM eventbox.subscriptions WHERE name = 't05_defaults';
-- the ordering cannot be changed
SELECT test.expect_error($$SELECT eventbox.alter_subscription('t05_defaults', ordering => 'aggregate')$$);
SELECT test.expect_error($$SELECT eventbox.alter_subscription('t05_full', ordering => 'none')$$);
-- bad values are checked as in subscribe, and change nothing
SELECT test.expect_error($$SELECT eventbox.alter_subscription('t05_defaults', max_attempts => 0)$$);
SELECT test.expect_error($$SELECT eventbox.alter_subscription('t05_defaults', event_types => '{}')$$);
SELECT test.expect_error($$SELECT eventbox.alter_subscription('t05_defaults', event_types => '{a/b}')$$);
SELECT test.expect_error($$SELECT eventbox.alter_subscription('t05_defaults', mode => 'poll')$$);
SELECT test.expect_error($$SELECT eventbox.alter_subscription('t05_defaults', channel => 'bad channel')$$);
SELECT test.expect_error($$SELECT eventbox.alter_subscription('t05_defaults', lease => '-1 s')$$);
SELECT test.expect_error($$SELECT eventbox.alter_subscription('t05_defaults', backoff_base => '2 h')$$);
SELECT test.expect_error($$SELECT eventbox.alter_subscription('t05_nope', lease => '1 s')$$);
SELECT name, mode, notify, event_types, channel, lease, max_attempts, backoff_base
FROM eventbox.subscriptions WHERE name = 't05_defaults';

-- pause and resume: a paused subscription hands out nothing, keeps its
-- events, and gives them after resume; both are idempotent
SELECT eventbox.subscribe('t05_pause', event_types => '{t05p.*}');
SELECT eventbox.publish('t05p.one') - :base AS id;
SELECT eventbox.pause('t05_pause');
SELECT eventbox.pause('t05_pause');
SELECT subscription, paused, pending FROM eventbox.stats WHERE subscription = 't05_pause';
SELECT count(*) FROM eventbox.claim_batch(10, 't05_pause');
SELECT eventbox.publish('t05p.two') - :base AS id;
SELECT eventbox.resume('t05_pause');
SELECT eventbox.resume('t05_pause');
SELECT subscription, paused, pending FROM eventbox.stats WHERE subscription = 't05_pause';
SELECT event_type FROM eventbox.claim_batch(10, 't05_pause') ORDER BY id;
SELECT test.expect_error($$SELECT eventbox.pause('t05_nope')$$);
SELECT test.expect_error($$SELECT eventbox.resume('t05_nope')$$);

-- unsubscribe removes the subscription with its cursors, leases, retries,
-- dead letters and counters; the name can be used again
SELECT eventbox.subscribe('t05_gone', event_types => '{t05u.*}', max_attempts => 1);
SELECT eventbox.publish('t05u.one') - :base AS id;
SELECT eventbox.publish('t05u.two') - :base AS id;
SELECT eventbox.publish('t05u.three') - :base AS id;
SELECT count(*) FROM eventbox.claim_batch(2, 't05_gone');
SELECT eventbox.nack(id, 'boom', subscription => 't05_gone')
FROM eventbox.log WHERE id > :base AND event_type = 't05u.one';
SELECT sub_id AS gone_id FROM eventbox.subscriptions WHERE name = 't05_gone' \gset
SELECT eventbox.unsubscribe('t05_gone');
SELECT (SELECT count(*) FROM eventbox.subscriptions WHERE sub_id = :gone_id) AS subscriptions,
	   (SELECT count(*) FROM eventbox.cursors WHERE sub_id = :gone_id) AS cursors,
	   (SELECT count(*) FROM eventbox.batches WHERE sub_id = :gone_id) AS batches,
	   (SELECT count(*) FROM eventbox.retries WHERE sub_id = :gone_id) AS retries,
	   (SELECT count(*) FROM eventbox.dead_letter_store WHERE sub_id = :gone_id) AS dead,
	   (SELECT count(*) FROM eventbox.counters WHERE sub_id = :gone_id) AS counters;
SELECT count(*) FROM eventbox.stats WHERE subscription = 't05_gone';
SELECT test.expect_error($$SELECT * FROM eventbox.claim_batch(1, 't05_gone')$$);
SELECT test.expect_error($$SELECT eventbox.unsubscribe('t05_gone')$$);
-- the events stay in the log for the other subscriptions
SELECT count(*) FROM eventbox.log WHERE id > :base AND event_type LIKE 't05u.%';
-- subscribing again starts afresh ('now')
SELECT eventbox.subscribe('t05_gone', event_types => '{t05u.*}');
SELECT count(*) FROM eventbox.claim_batch(10, 't05_gone');

-- bad input
-- duplicate name
SELECT test.expect_error($$SELECT eventbox.subscribe('t05_defaults')$$);
SELECT test.expect_error($$SELECT eventbox.subscribe('default')$$);
-- invalid names
SELECT test.expect_error($$SELECT eventbox.subscribe('')$$);
SELECT test.expect_error($$SELECT eventbox.subscribe('bad name')$$);
SELECT test.expect_error($$SELECT eventbox.subscribe('.dot')$$);
SELECT test.expect_error($$SELECT eventbox.subscribe('-dash')$$);
SELECT test.expect_error($$SELECT eventbox.subscribe('quote"s')$$);
SELECT test.expect_error($$SELECT eventbox.subscribe('ünïcode')$$);
SELECT test.expect_error($$SELECT eventbox.subscribe('t05_' || repeat('x', 60))$$);
-- invalid channels
SELECT test.expect_error($$SELECT eventbox.subscribe('t05_bad', channel => '')$$);
SELECT test.expect_error($$SELECT eventbox.subscribe('t05_bad', channel => 'two words')$$);
SELECT test.expect_error($$SELECT eventbox.subscribe('t05_bad', channel => 'semi;colon')$$);
SELECT test.expect_error($$SELECT eventbox.subscribe('t05_bad', channel => repeat('c', 64))$$);
-- modes, notify, ordering, start_at
SELECT test.expect_error($$SELECT eventbox.subscribe('t05_bad', mode => 'poll')$$);
SELECT test.expect_error($$SELECT eventbox.subscribe('t05_bad', mode => 'PULL')$$);
SELECT test.expect_error($$SELECT eventbox.subscribe('t05_bad', notify => 'all')$$);
SELECT test.expect_error($$SELECT eventbox.subscribe('t05_bad', ordering => 'global')$$);
SELECT test.expect_error($$SELECT eventbox.subscribe('t05_bad', start_at => 'yesterday')$$);
-- patterns
SELECT test.expect_error($$SELECT eventbox.subscribe('t05_bad', event_types => '{}')$$);
SELECT test.expect_error($$SELECT eventbox.subscribe('t05_bad', event_types => '{""}')$$);
SELECT test.expect_error($$SELECT eventbox.subscribe('t05_bad', event_types => '{order.*,NULL}')$$);
SELECT test.expect_error($$SELECT eventbox.subscribe('t05_bad', event_types => '{order/created}')$$);
SELECT test.expect_error($$SELECT eventbox.subscribe('t05_bad', event_types => '{order.[ab]}')$$);
SELECT test.expect_error($$SELECT eventbox.subscribe('t05_bad', event_types => '{order.(x|y)}')$$);
SELECT test.expect_error($$SELECT eventbox.subscribe('t05_bad', event_types => '{order.+}')$$);
SELECT test.expect_error($$SELECT eventbox.subscribe('t05_bad', event_types => '{"order created"}')$$);
SELECT test.expect_error($$SELECT eventbox.subscribe('t05_bad', event_types => ARRAY[repeat('a', 256)])$$);
SELECT test.expect_error($$SELECT eventbox.subscribe('t05_bad', event_types => '{{a},{b}}')$$);
-- intervals and attempts
SELECT test.expect_error($$SELECT eventbox.subscribe('t05_bad', lease => '0')$$);
SELECT test.expect_error($$SELECT eventbox.subscribe('t05_bad', lease => '-5 seconds')$$);
SELECT test.expect_error($$SELECT eventbox.subscribe('t05_bad', backoff_base => '-1 second')$$);
SELECT test.expect_error($$SELECT eventbox.subscribe('t05_bad', backoff_max => '-1 hour')$$);
SELECT test.expect_error($$SELECT eventbox.subscribe('t05_bad', backoff_base => '2 hours', backoff_max => '1 hour')$$);
SELECT test.expect_error($$SELECT eventbox.subscribe('t05_bad', max_attempts => 0)$$);
SELECT test.expect_error($$SELECT eventbox.subscribe('t05_bad', max_attempts => -1)$$);
-- NULL for a required argument: SQLSTATE 22004 (null_value_not_allowed)
SELECT a.sql, test.sqlstate(a.sql) FROM (VALUES
	($$SELECT eventbox.subscribe(NULL)$$),
	($$SELECT eventbox.subscribe('t05_bad', event_types => NULL)$$),
	($$SELECT eventbox.subscribe('t05_bad', mode => NULL)$$),
	($$SELECT eventbox.subscribe('t05_bad', ordering => NULL)$$),
	($$SELECT eventbox.subscribe('t05_bad', lease => NULL)$$),
	($$SELECT eventbox.subscribe('t05_bad', max_attempts => NULL)$$),
	($$SELECT eventbox.subscribe('t05_bad', backoff_base => NULL)$$),
	($$SELECT eventbox.subscribe('t05_bad', backoff_max => NULL)$$),
	($$SELECT eventbox.subscribe('t05_bad', start_at => NULL)$$)
) a(sql);
-- unsubscribe, pause, resume and alter_subscription need a name: a NULL
-- name is an error (22004) and does not fall back to eventbox.subscription
-- (that is the consumers' default, not a target for management calls)
SET eventbox.subscription = 't05_defaults';
SELECT eventbox.pause('t05_defaults');
SELECT a.sql, test.sqlstate(a.sql) FROM (VALUES
	($$SELECT eventbox.unsubscribe(NULL)$$),
	($$SELECT eventbox.resume(NULL)$$),
	($$SELECT eventbox.alter_subscription(NULL, lease => '1 s')$$)
) a(sql);
RESET eventbox.subscription;
-- still there, still paused, lease unchanged
SELECT name, paused, lease FROM eventbox.subscriptions WHERE name = 't05_defaults';
-- none of the failed calls left anything behind
SELECT count(*) FROM eventbox.subscriptions WHERE name = 't05_bad';

-- clean up
SELECT count(*) FROM (
	SELECT eventbox.unsubscribe(name) FROM eventbox.subscriptions WHERE name LIKE 't05%'
) s;
SELECT count(*) FROM eventbox.subscriptions WHERE name LIKE 't05%';
