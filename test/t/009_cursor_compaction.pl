# Copyright (c) eventbox contributors

# 009_cursor_compaction.pl: after a long transaction let the cursor rows
# walk to the end of their table, the worker moves them back to its start,
# so that VACUUM can give the space back.
#
# - while the horizon is held, claims leave a version per cursor move and
#   the table grows; nothing is moved then (nothing near the start can be
#   pruned);
# - once the horizon moves on, every cursor row comes back to the first
#   pages and VACUUM truncates the rest;
# - a row that a claim holds locked is left where it is until the lock goes;
# - the worker's wake-up check for the pull subscription follows the
#   cursor row from the version it saw last instead of looking it up
#   through its index (which walks every version the claims left):
#   each publish still wakes the consumer, and the key is not read;
# - across the moves the pull consumer gets every event once, and the
#   worker's push_once position (held in memory, written by ctid) is kept:
#   the default subscription delivers every event once.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use EventboxListener;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('compaction');
$node->init;
$node->append_conf(
	'postgresql.conf', qq{
shared_preload_libraries = 'eventbox'
eventbox.naptime = '100ms'
autovacuum = off
statement_timeout = '120s'
});
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION eventbox');
$node->safe_psql('postgres', "SELECT eventbox.subscribe('cc', '{cc.*}')");

# the highest page a cursor row is on
my $max_page = q{SELECT max((ctid::text::point)[0])::int FROM eventbox.cursors};
my $cc_page = q{SELECT (c.ctid::text::point)[0]::int FROM eventbox.cursors c
  JOIN eventbox.subscriptions s USING (sub_id) WHERE s.name = 'cc'};

# $n rounds of publish, claim and ack, each in its own transaction; returns
# how many events were acked
sub rounds
{
	my ($n) = @_;
	$node->safe_psql(
		'postgres', qq{
CREATE TABLE IF NOT EXISTS acked (n bigint);
DO \$\$
DECLARE
	ids bigint[];
BEGIN
	FOR i IN 1..$n LOOP
		PERFORM eventbox.publish('cc.ev', jsonb_build_object('i', i));
		COMMIT;
		SELECT array_agg(id) INTO ids FROM eventbox.claim_batch(10, 'cc');
		IF ids IS NOT NULL THEN
			INSERT INTO acked VALUES (eventbox.ack(ids, 'cc'));
		END IF;
		COMMIT;
	END LOOP;
END
\$\$;
});
	return $node->safe_psql('postgres',
		'SELECT coalesce(sum(n), 0) FROM acked; TRUNCATE acked');
}

# --- the horizon held: the table grows, nothing moves ----------------------------
my $holder = $node->background_psql('postgres');
$holder->query_safe(
	'BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM eventbox.subscriptions;');
my $acked = rounds(3000);
is($acked, '3000', 'every event published under the held horizon was claimed and acked');
my $size = $node->safe_psql('postgres', "SELECT pg_relation_size('eventbox.cursors') / 8192");
cmp_ok($size, '>', 20, "the cursor table grew to $size pages");
my $page = $node->safe_psql('postgres', $cc_page);
cmp_ok($page, '>', 8, "the pull cursor's row is on page $page");
sleep 3;    # compaction looks about once a second
cmp_ok($node->safe_psql('postgres', $cc_page), '>=', $page,
	'nothing moves back while the horizon is held');

# --- the wake-up check follows the cursor row, not its key -------------------------
# Every claim above left a version of the 'cc' row; a lookup through the
# index on (sub_id, lane) visits all 3,000.  Each wake-up below comes from a check that
# read the row (one key lookup each, before the check followed versions).
my $key_reads = q{SELECT pg_stat_get_numscans('eventbox.cursors_sub_lane_idx'::regclass)};
my $listener = EventboxListener->start($node, 'postgres', ['cc']);
my $consumer = $node->background_psql('postgres');
$consumer->query_safe("SELECT count(*) FROM eventbox.claim_batch(10, 'cc')");
$node->safe_psql('postgres', 'SELECT pg_stat_force_next_flush()');
my $reads_before = $node->safe_psql('postgres', $key_reads);
my $woken = 0;
for my $i (1 .. 20)
{
	my $seen = scalar($listener->messages);
	$node->safe_psql('postgres', "SELECT eventbox.publish('cc.wake', '{}')");
	$listener->wait_for(sub { scalar(@_) > $seen }, "wake-up $i under the held horizon");
	$woken++
	  if $consumer->query_safe(
		"SELECT eventbox.ack(array_agg(id), 'cc') FROM eventbox.claim_batch(10, 'cc')") eq '1';
}
$consumer->quit;
$listener->stop;
is($woken, 20, 'each of 20 publishes woke the pull consumer, which claimed the event');
# the worker reports its counters at most once a second
sleep 2;
$node->safe_psql('postgres', 'SELECT pg_stat_force_next_flush()');
my $key_delta = $node->safe_psql('postgres', $key_reads) - $reads_before;
cmp_ok($key_delta, '<=', 3,
	"the wake-up checks read the cursor by its key $key_delta times for 20 wake-ups");

# --- a row a claim holds locked stays until the lock goes --------------------------
my $locker = $node->background_psql('postgres');
$locker->query_safe(
	"BEGIN; SELECT count(*) FROM eventbox.claim_batch(10, 'cc');");
$holder->query_safe('COMMIT;');
$holder->quit;
ok( $node->poll_query_until(
		'postgres',
		"SELECT max((c.ctid::text::point)[0]) < 8 FROM eventbox.cursors c"
		  . " JOIN eventbox.subscriptions s USING (sub_id) WHERE s.name <> 'cc'"),
	'once the horizon moved on, the other cursor rows came back to the first pages');
cmp_ok($node->safe_psql('postgres', $cc_page), '>=', $page,
	'the row a claim holds locked was left where it is');
$locker->query_safe('COMMIT;');
$locker->quit;
ok($node->poll_query_until('postgres', "SELECT ($max_page) < 8"),
	'after the lock went, that row came back too');

$node->safe_psql('postgres', 'VACUUM eventbox.cursors');
$size = $node->safe_psql('postgres', "SELECT pg_relation_size('eventbox.cursors') / 8192");
cmp_ok($size, '<=', 8, "VACUUM truncated the cursor table to $size pages");

# --- nothing lost or repeated across the moves --------------------------------------
$acked = rounds(200);
is($acked, '200', 'after the moves the pull consumer gets each new event once');
is($node->safe_psql('postgres', "SELECT count(*) FROM eventbox.claim_batch(1000, 'cc')"),
	'0', 'and nothing old comes back');
my $published = $node->safe_psql('postgres', 'SELECT count(*) FROM eventbox.log');
ok( $node->poll_query_until(
		'postgres',
		"SELECT pending = 0 AND delivered_total = $published FROM eventbox.stats"
		  . " WHERE subscription = 'default'"),
	"the default push_once subscription delivered each of the $published events once");

$node->stop;
done_testing();
