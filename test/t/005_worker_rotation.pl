# Storage rotation and failed worker cycles.
#
# Rotation: with retention 0 and a 1 s rotation period, consumed events are
# reclaimed by TRUNCATE of whole log partitions; a lagging subscription
# holds its partition; a reader holding a lock on a partition only makes
# the worker skip it (publishers keep going); nothing unconsumed is ever
# reclaimed.
#
# Failed cycles: a session holding a push subscription's cursor lock beyond
# the worker's lock_timeout makes cycles fail; the failure is logged once,
# the cycle is retried with backoff, and when the lock goes every event is
# delivered.  (push_once cursors are not locked by the cycles: the worker
# holds their positions in memory.)
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('rotation');
$node->init;
$node->append_conf(
	'postgresql.conf', q{
shared_preload_libraries = 'eventbox'
eventbox.retention = 0
eventbox.rotation_period = '1s'
eventbox.naptime = '100ms'
fsync = off
log_min_messages = log
});
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION eventbox');
$node->safe_psql('postgres', "SELECT eventbox.subscribe('reader')");

sub publish_batch
{
	my ($n, $tag) = @_;
	$node->safe_psql('postgres',
		"SELECT count(*) FROM eventbox.publish_batch((SELECT jsonb_agg(jsonb_build_object("
		  . "'event_type', 'rot.$tag', 'payload', jsonb_build_object('i', g))) "
		  . "FROM generate_series(1, $n) g))");
}

sub rows_per_part
{
	return $node->safe_psql('postgres',
		"SELECT string_agg(tableoid::regclass || '=' || n, ',' ORDER BY 1) FROM "
		  . "(SELECT tableoid, count(*) AS n FROM eventbox.log GROUP BY 1) s");
}

# --- a lagging pull subscription holds storage --------------------------------------
publish_batch(2000, 'a');
sleep 3;    # several rotation rounds
my $lagging = $node->safe_psql('postgres', 'SELECT count(*) FROM eventbox.log');
is($lagging, '2000', 'unconsumed events are never reclaimed (pull subscription lags)');

# consume them: the partition becomes reclaimable
$node->safe_psql('postgres',
	"SELECT eventbox.ack(array_agg(id), 'reader') FROM eventbox.claim_batch(5000, 'reader')");
ok( $node->poll_query_until(
		'postgres', 'SELECT count(*) = 0 FROM eventbox.log'),
	'consumed events are reclaimed by rotation');
my $sizes = $node->safe_psql('postgres',
	"SELECT sum(pg_relation_size(c.oid)) FROM pg_class c "
	  . "WHERE c.relname IN ('log_0', 'log_1', 'log_2') "
	  . "AND c.relnamespace = 'eventbox'::regnamespace");
is($sizes, '0', 'truncated partitions occupy no heap pages');
my $dead = $node->safe_psql('postgres',
	"SELECT coalesce(sum(n_dead_tup), 0) FROM pg_stat_user_tables "
	  . "WHERE schemaname = 'eventbox' AND relname LIKE 'log_%'");
is($dead, '0', 'the log partitions have no dead tuples');

# --- a reader holding a lock on a full partition: the worker skips it -------------
# The reader takes its lock before the events are consumed: with retention
# 0 the worker would otherwise reclaim them at once.
publish_batch(500, 'b');
my $part = $node->safe_psql('postgres',
	"SELECT DISTINCT tableoid::regclass FROM eventbox.log");
like($part, qr/^eventbox\.log_\d$/, "the new events sit in one partition ($part)");

my $holder = $node->background_psql('postgres');
$holder->query_safe("BEGIN; SELECT count(*) FROM $part;");
$node->safe_psql('postgres',
	"SELECT eventbox.ack(array_agg(id), 'reader') FROM eventbox.claim_batch(5000, 'reader')");
sleep 3;    # rounds in which the truncation cannot get its lock
is($node->safe_psql('postgres', "SELECT count(*) FROM $part"),
	'500', 'a consumed partition that a reader holds is not truncated under it');
# publishers are not held up meanwhile (they write to the current partition)
publish_batch(100, 'c');
pass('publishing works while a truncation waits for its lock');
$holder->query_safe('COMMIT;');
$holder->quit;
$node->safe_psql('postgres',
	"SELECT eventbox.ack(array_agg(id), 'reader') FROM eventbox.claim_batch(5000, 'reader')");
ok( $node->poll_query_until(
		'postgres', 'SELECT count(*) = 0 FROM eventbox.log'),
	'after the reader leaves, the partition is reclaimed');

# --- a failing cycle is rolled back, logged once, retried, and loses nothing -------
$node->safe_psql('postgres',
	"SELECT eventbox.subscribe('failpush', '{fail.*}', mode => 'push', channel => 'failpush')");
# the default subscription's position has reached its row
ok( $node->poll_query_until(
		'postgres', "SELECT pending = 0 FROM eventbox.stats WHERE subscription = 'default'"),
	'the default subscription has nothing pending');
my $log_offset = -s $node->logfile;
my $locker = $node->background_psql('postgres');
$locker->query_safe(
	"BEGIN; SELECT 1 FROM eventbox.cursors c JOIN eventbox.subscriptions s USING (sub_id) "
	  . "WHERE s.name = 'failpush' FOR UPDATE;");
$node->safe_psql('postgres',
	"SELECT eventbox.publish('fail.test', jsonb_build_object('i', g)) FROM generate_series(1, 20) g");
ok( $node->wait_for_log(qr/eventbox worker cycle failed: .*lock timeout/, $log_offset),
	'a cycle that cannot get its lock fails and says so');
sleep 6;    # more failing rounds, with backoff
my $log = slurp_file($node->logfile, $log_offset);
my $failures = () = $log =~ /eventbox worker cycle failed/g;
is($failures, 1, 'a run of failing cycles is logged once');
is( $node->safe_psql('postgres',
		"SELECT pending FROM eventbox.stats WHERE subscription = 'default'"),
	'20', 'nothing was lost while the cycles failed: the 20 events are pending');
$locker->query_safe('COMMIT;');
$locker->quit;
ok( $node->poll_query_until(
		'postgres',
		"SELECT pending = 0 AND delivered_total >= 20 FROM eventbox.stats WHERE subscription = 'default'"),
	'once the lock is gone every event is delivered');
ok($node->wait_for_log(qr/eventbox worker cycle succeeded again after \d+ failed attempts/,
		$log_offset),
	'the recovery is logged');
$node->safe_psql('postgres', "SELECT eventbox.unsubscribe('failpush')");

# --- rounds that change nothing leave the rotation row alone -------------------
# Every publish reads that row; a version per round would pile up under a
# long transaction.  With a period of an hour no round switches.
$node->safe_psql('postgres',
	"ALTER SYSTEM SET eventbox.rotation_period = '1h'; SELECT pg_reload_conf();");
sleep 2;    # a round may still switch under the old period
my $before = $node->safe_psql('postgres', 'SELECT ctid, xmin FROM eventbox.rotation');
sleep 3;    # three or more rounds
is($node->safe_psql('postgres', 'SELECT ctid, xmin FROM eventbox.rotation'),
	$before, 'rotation rounds that switch nothing do not write the rotation row');

$node->stop;
done_testing();
