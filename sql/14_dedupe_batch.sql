--
-- 14_dedupe_batch: a publish_batch with many dedupe keys.  It takes one
-- lock for all keys instead of one per key, which ran out of the shared
-- lock table; duplicates inside the batch are found by sorting the keys.
-- Last, so that its 30,000 events slow no other test.
--
-- 30,000 keys, each twice (the copies far apart): the first of each key is
-- written, its copy gets its id.  With a lock per key this batch failed
-- with "out of shared memory".
SELECT count(*) AS elements, count(DISTINCT id) AS events,
	   bool_and(id = first_id) AS copies_get_the_first_id
FROM (SELECT id, k, first_value(id) OVER (PARTITION BY (k - 1) % 30000 ORDER BY k) AS first_id
	  FROM eventbox.publish_batch((
		SELECT jsonb_agg(jsonb_build_object('event_type', 't14.many',
				'dedupe_key', 'many-' || ((g - 1) % 30000)) ORDER BY g)
		FROM generate_series(1, 60000) g)) WITH ORDINALITY AS b(id, k)) x;
-- the same keys again, in another order: the events of the first batch,
-- nothing new (the log still holds 30,000 of them)
SELECT count(*) AS elements, count(DISTINCT id) AS events,
	   count(*) FILTER (WHERE id IN (SELECT id FROM eventbox.log
									WHERE event_type = 't14.many')) AS found
FROM eventbox.publish_batch((
	SELECT jsonb_agg(jsonb_build_object('event_type', 't14.many',
			'dedupe_key', 'many-' || g) ORDER BY g DESC)
	FROM generate_series(0, 29999) g)) AS b(id);
SELECT count(*) FROM eventbox.log WHERE event_type = 't14.many';
