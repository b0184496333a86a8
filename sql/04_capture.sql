--
-- 04_capture: the eventbox.capture() row trigger.
--
SELECT eventbox.subscribe('t04', event_types => '{t04_*}', start_at => 'now');
SELECT test.last_id() AS base \gset

-- a table with a primary key
CREATE TABLE t04_orders (id int PRIMARY KEY, status text, total numeric);
CREATE TRIGGER t04_orders_capture AFTER INSERT OR UPDATE OR DELETE ON t04_orders
	FOR EACH ROW EXECUTE FUNCTION eventbox.capture('t04_order');
INSERT INTO t04_orders VALUES (1, 'new', 9.90), (2, 'new', 20);
UPDATE t04_orders SET status = 'paid' WHERE id = 1;
DELETE FROM t04_orders WHERE id = 2;
-- a statement that touches no row publishes nothing
UPDATE t04_orders SET status = 'x' WHERE id = 99;
-- a rolled-back change publishes nothing (G1)
BEGIN;
INSERT INTO t04_orders VALUES (3, 'rolled back', 0);
ROLLBACK;
SELECT id - :base AS id, event_type, aggregate_type, aggregate_id, payload
FROM eventbox.log WHERE id > :base ORDER BY id;

-- the request context reaches trigger-captured events
BEGIN;
SET LOCAL eventbox.actor = 'alice';
SET LOCAL eventbox.correlation_id = 'req-42';
UPDATE t04_orders SET total = 10 WHERE id = 1;
COMMIT;
SELECT event_type, headers FROM eventbox.log WHERE id > :base ORDER BY id DESC LIMIT 1;

-- a composite primary key: the key values joined by ':' in key order
-- (not column order)
CREATE TABLE t04_lines (line int, order_id int, sku text, PRIMARY KEY (order_id, line));
CREATE TRIGGER t04_lines_capture AFTER INSERT OR UPDATE OR DELETE ON t04_lines
	FOR EACH ROW EXECUTE FUNCTION eventbox.capture('t04_line');
INSERT INTO t04_lines VALUES (3, 1, 'abc');
-- a text key
CREATE TABLE t04_users (email text PRIMARY KEY, name text);
CREATE TRIGGER t04_users_capture AFTER INSERT OR UPDATE OR DELETE ON t04_users
	FOR EACH ROW EXECUTE FUNCTION eventbox.capture('t04_user');
INSERT INTO t04_users VALUES ('a@example.com', 'A');
-- an UPDATE of the key: the aggregate id is the new key
UPDATE t04_users SET email = 'b@example.com';
-- a named id column instead of the primary key (the table need not have one)
CREATE TABLE t04_payments (pay_no bigint, order_ref text, amount int);
CREATE TRIGGER t04_payments_capture AFTER INSERT OR UPDATE OR DELETE ON t04_payments
	FOR EACH ROW EXECUTE FUNCTION eventbox.capture('t04_payment', 'order_ref');
INSERT INTO t04_payments VALUES (1, 'ord-7', 100);
-- a NULL in the named column cannot be an aggregate id: the insert fails
SELECT test.expect_error($$INSERT INTO t04_payments VALUES (2, NULL, 5)$$);
DELETE FROM t04_payments WHERE pay_no = 1;
-- a table in another schema
CREATE SCHEMA t04_s;
CREATE TABLE t04_s.items (id int PRIMARY KEY);
CREATE TRIGGER t04_items_capture AFTER INSERT ON t04_s.items
	FOR EACH ROW EXECUTE FUNCTION eventbox.capture('t04_item');
INSERT INTO t04_s.items VALUES (5);
SELECT test.last_id() AS base2 \gset
SELECT id - :base AS id, event_type, aggregate_type, aggregate_id, payload
FROM eventbox.log WHERE id > :base AND event_type !~ '^t04_order' ORDER BY id;

-- the consumer gets them all, with the same payload (G6)
SELECT event_type, aggregate_id, payload->'new' AS new, payload->'old' AS old
FROM eventbox.claim_batch(100, 't04') ORDER BY id;

-- errors
-- no primary key and no column named
CREATE TABLE t04_nokey (a int, b text);
CREATE TRIGGER t04_nokey_capture AFTER INSERT OR UPDATE OR DELETE ON t04_nokey
	FOR EACH ROW EXECUTE FUNCTION eventbox.capture('t04_nokey');
SELECT test.expect_error($$INSERT INTO t04_nokey VALUES (1, 'x')$$);
-- a named column that does not exist
CREATE TABLE t04_badcol (id int PRIMARY KEY);
CREATE TRIGGER t04_badcol_capture AFTER INSERT ON t04_badcol
	FOR EACH ROW EXECUTE FUNCTION eventbox.capture('t04_badcol', 'nope');
SELECT test.expect_error($$INSERT INTO t04_badcol VALUES (1)$$);
-- a BEFORE trigger
CREATE TABLE t04_before (id int PRIMARY KEY);
CREATE TRIGGER t04_before_capture BEFORE INSERT ON t04_before
	FOR EACH ROW EXECUTE FUNCTION eventbox.capture('t04_before');
SELECT test.expect_error($$INSERT INTO t04_before VALUES (1)$$);
-- a statement-level trigger
CREATE TABLE t04_stmt (id int PRIMARY KEY);
CREATE TRIGGER t04_stmt_capture AFTER INSERT ON t04_stmt
	FOR EACH STATEMENT EXECUTE FUNCTION eventbox.capture('t04_stmt');
SELECT test.expect_error($$INSERT INTO t04_stmt VALUES (1)$$);
-- no argument, too many arguments
CREATE TABLE t04_args (id int PRIMARY KEY);
CREATE TRIGGER t04_args_capture AFTER INSERT ON t04_args
	FOR EACH ROW EXECUTE FUNCTION eventbox.capture();
SELECT test.expect_error($$INSERT INTO t04_args VALUES (1)$$);
DROP TRIGGER t04_args_capture ON t04_args;
CREATE TRIGGER t04_args_capture AFTER INSERT ON t04_args
	FOR EACH ROW EXECUTE FUNCTION eventbox.capture('a', 'id', 'c');
SELECT test.expect_error($$INSERT INTO t04_args VALUES (1)$$);
-- an aggregate type that makes an invalid event type
DROP TRIGGER t04_args_capture ON t04_args;
CREATE TRIGGER t04_args_capture AFTER INSERT ON t04_args
	FOR EACH ROW EXECUTE FUNCTION eventbox.capture('bad type');
SELECT test.expect_error($$INSERT INTO t04_args VALUES (1)$$);
-- TRUNCATE is not a row event
CREATE TRIGGER t04_trunc_capture AFTER TRUNCATE ON t04_args
	FOR EACH STATEMENT EXECUTE FUNCTION eventbox.capture('t04_args');
SELECT test.expect_error($$TRUNCATE t04_args$$);
-- a failing capture aborts the business statement: no row, no event
SELECT count(*) AS rows FROM t04_nokey;
SELECT count(*) AS rows FROM t04_before;
SELECT test.last_id() = :base2 AS no_ids_used,
	   (SELECT count(*) FROM eventbox.log WHERE id > :base2) AS events;

-- capture() cannot be called as a plain function
SELECT test.expect_error($$SELECT eventbox.capture()$$);

DROP TABLE t04_orders, t04_lines, t04_users, t04_payments, t04_nokey, t04_badcol,
	t04_before, t04_stmt, t04_args;
DROP SCHEMA t04_s CASCADE;
SELECT eventbox.unsubscribe('t04');
