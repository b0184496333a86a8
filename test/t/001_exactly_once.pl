
# Copyright (c) eventbox contributors

# 001_exactly_once.pl: concurrency stress check of G1, G2, G3 and G5.
#
# At least 100,000 events are published by 8 concurrent pgbench clients.
# About 20% of the publishing transactions roll back, and about 10% of them
# publish a "ghost" event inside a savepoint that is rolled back before the
# transaction commits.  While they run, 4 consumers per subscription claim
# batches, record what they got in the table `consumed` and ack exactly
# those events, all in one transaction per batch.  Two pull subscriptions
# take every event: `plain` (unordered) and `ordered` (ordering => 'aggregate').
#
# Then, for each subscription: every committed event was consumed exactly
# once, nothing of a rolled-back transaction or savepoint was consumed,
# nothing is left pending, leased or retried, and in `ordered` the events of
# each aggregate were consumed in commit order by claims that never
# overlapped.
#
# Publishers serialize per aggregate with pg_advisory_xact_lock taken before
# they publish, so per aggregate the order of event ids is the commit order
# that G5 promises.  Consumers ack inside the claiming transaction with a
# long lease, so there are no retries and consumption order is the order of
# the bigserial `consumed.seq`.
#
# EVENTBOX_STRESS_SEED sets pgbench's random seed (printed either way).
# EVENTBOX_STRESS_EVENTS lowers or raises the 100,000 target for quick
# local runs; the check below always compares against the number used.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use IPC::Run;
use Time::HiRes qw(time usleep);

my $target = $ENV{EVENTBOX_STRESS_EVENTS} // 100_000;
my $seed = $ENV{EVENTBOX_STRESS_SEED} // int(rand(2**31));
my $publishers = 8;
my $consumers = 4;			# per subscription
my $batch = 500;
my $rollback_pct = 20;
my $ghost_pct = 10;
my $aggregates = 20;		# agg1 in 1..20, agg2 in agg1..agg1+3
my @subs = ('plain', 'ordered');

note "pgbench random seed $seed (set EVENTBOX_STRESS_SEED to repeat)";

my $started = time;

my $node = PostgreSQL::Test::Cluster->new('main');
$node->init;
$node->append_conf(
	'postgresql.conf', qq{
shared_preload_libraries = 'eventbox'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 40
# a hung claim or lock wait fails the run instead of hanging it
statement_timeout = '3min'
});
$node->start;

$node->safe_psql(
	'postgres', qq{
CREATE EXTENSION eventbox;
SELECT eventbox.subscribe('plain', lease => '10 minutes');
SELECT eventbox.subscribe('ordered', ordering => 'aggregate', lease => '10 minutes');

CREATE SEQUENCE marker_seq;
-- one row per committed publishing transaction: its marker and how many
-- events (k = 1..n) it published
CREATE TABLE committed (marker text PRIMARY KEY, n int NOT NULL);
-- markers of ghost events (published in a rolled-back savepoint) of
-- committed transactions
CREATE TABLE ghosts (marker text PRIMARY KEY);
CREATE TABLE consumed (
	seq		bigserial PRIMARY KEY,
	sub		text NOT NULL,
	id		bigint NOT NULL,
	etype	text NOT NULL,
	agg		text,
	marker	text,
	k		int,
	attempt	int,
	xid		xid8 NOT NULL DEFAULT pg_current_xact_id()
);
CREATE INDEX ON consumed (xid);
-- one row per consumer transaction: how many events it claimed and acked
CREATE TABLE claims (
	sub		text NOT NULL,
	claimed	int NOT NULL,
	acked	int NOT NULL,
	xid		xid8 NOT NULL DEFAULT pg_current_xact_id()
);
});

my $dir = PostgreSQL::Test::Utils::tempdir;

# The publishing transaction.  Event k of a transaction goes to agg1 when k
# is odd and to agg2 when k is even; both locks are taken before the first
# publish, in increasing order, so publishers never deadlock.  The INSERT
# before the locks gives the transaction its xid before it may wait, so
# xids commit out of order (ids, drawn by publish after the locks, follow
# commit order per aggregate).
my $pub_script = "$dir/publish.sql";
PostgreSQL::Test::Utils::append_to_file(
	$pub_script, qq{
\\set agg1 random(1, $aggregates)
\\set agg2 :agg1 + random(0, 3)
\\set n random(1, 3)
\\set rb random(1, 100)
\\set ghost random(1, 100)
BEGIN;
SELECT 'm' || nextval('marker_seq') AS m \\gset
INSERT INTO committed (marker, n) VALUES (':m', :n);
SELECT pg_advisory_xact_lock(:agg1);
SELECT pg_advisory_xact_lock(:agg2);
SELECT eventbox.publish('stress.event', '{"m": ":m", "k": 1}', 'acct', ':agg1');
\\if :n >= 2
SELECT eventbox.publish('stress.event', '{"m": ":m", "k": 2}', 'acct', ':agg2');
\\endif
\\if :ghost <= $ghost_pct
SAVEPOINT g;
SELECT eventbox.publish('stress.ghost', '{"m": "ghost-:m", "k": 0}', 'acct', ':agg1');
ROLLBACK TO SAVEPOINT g;
INSERT INTO ghosts VALUES ('ghost-:m');
\\endif
\\if :n >= 3
SELECT eventbox.publish('stress.event', '{"m": ":m", "k": 3}', 'acct', ':agg1');
\\endif
\\if :rb <= $rollback_pct
ROLLBACK;
\\else
COMMIT;
\\endif
});

# The consuming transaction: claim, record, ack exactly what was recorded
# (the rows this transaction inserted), record the counts.  An empty claim
# sleeps a little so idle consumers do not starve the publishers.
for my $sub (@subs)
{
	PostgreSQL::Test::Utils::append_to_file(
		"$dir/consume_$sub.sql", qq{
BEGIN;
INSERT INTO consumed (sub, id, etype, agg, marker, k, attempt)
	SELECT c.subscription, c.id, c.event_type, c.aggregate_id,
		   c.payload->>'m', (c.payload->>'k')::int, c.attempt
	FROM eventbox.claim_batch($batch, '$sub') c;
INSERT INTO claims (sub, claimed, acked)
	SELECT '$sub', coalesce(cardinality(ids), 0),
		   CASE WHEN ids IS NULL THEN 0 ELSE eventbox.ack(ids, '$sub') END
	FROM (SELECT array_agg(id) AS ids FROM consumed
		  WHERE xid = pg_current_xact_id() AND sub = '$sub') s
	RETURNING claimed AS got \\gset
COMMIT;
\\if :got = 0
\\sleep 20 ms
\\endif
});
}

my $runs = 0;

# Start pgbench in the background; output goes to files in $dir.
sub start_pgbench
{
	my ($script, $clients, $txns) = @_;
	$runs++;
	my $out = "$dir/pgbench_$runs.out";
	my $err = "$dir/pgbench_$runs.err";
	my @cmd = (
		'pgbench', '-n', '-h', $node->host, '-p', $node->port,
		'-c', $clients, '-j', ($clients > 4 ? 4 : $clients),
		'-t', $txns, "--random-seed=$seed", '-f', $script, 'postgres');
	my $h = IPC::Run::start(\@cmd, '<', '/dev/null', '>', $out, '2>', $err);
	return { h => $h, out => $out, err => $err, what => "$script x $clients" };
}

# Wait for a pgbench started by start_pgbench and check that every client
# finished without error.
my $pgbench_failures = 0;

sub finish_pgbench
{
	my ($p) = @_;
	my $ok = $p->{h}->finish;
	if (!$ok)
	{
		$pgbench_failures++;
		diag "pgbench $p->{what} failed: exit "
		  . ($p->{h}->full_result >> 8) . "\n"
		  . PostgreSQL::Test::Utils::slurp_file($p->{err});
	}
	return $ok;
}

sub consumed_count
{
	return $node->safe_psql('postgres', 'SELECT count(*) FROM consumed');
}

# One round of consumers: $consumers clients per subscription, $txns
# batches each.
sub consumer_round
{
	my ($txns) = @_;
	my @p = map { start_pgbench("$dir/consume_$_.sql", $consumers, $txns) } @subs;
	finish_pgbench($_) for @p;
}

sub committed_events
{
	return $node->safe_psql('postgres',
		'SELECT coalesce(sum(n), 0) FROM committed');
}

# Expected committed events per transaction: 2 * (1 - rollback share).
my $per_client =
  int($target / (2 * (100 - $rollback_pct) / 100) / $publishers * 1.04) + 1;
my $attempted = 0;
my $consumer_rounds = 0;

my $pub_started = time;
while (committed_events() < $target)
{
	my $left = $target - committed_events();
	my $txns = $attempted == 0 ? $per_client : int($left / 10) + 10;
	my $pub = start_pgbench($pub_script, $publishers, $txns);
	$attempted += $publishers * $txns;

	# consumers run in rounds while the publishers work
	while ($pub->{h}->pumpable)
	{
		consumer_round(25);
		$consumer_rounds++;
	}
	finish_pgbench($pub);
	last if $pgbench_failures;
}
my $pub_secs = time - $pub_started;

# Drain: keep consuming until three rounds in a row claimed nothing.
my $empty = 0;
my $drain_rounds = 0;
while ($empty < 3 && !$pgbench_failures && $drain_rounds < 1000)
{
	my $before = consumed_count();
	consumer_round(4);
	$drain_rounds++;
	$empty = consumed_count() == $before ? $empty + 1 : 0;
}
my $total_secs = time - $pub_started;

is($pgbench_failures, 0, 'every pgbench client finished without error');

my ($committed_txns, $events, $ghosts, $ids_drawn, $batches) = split /\|/,
  $node->safe_psql(
	'postgres', q{
SELECT (SELECT count(*) FROM committed),
	   (SELECT coalesce(sum(n), 0) FROM committed),
	   (SELECT count(*) FROM ghosts),
	   (SELECT last_value FROM eventbox.log_id_seq),
	   (SELECT count(*) FROM claims WHERE claimed > 0)
});
my $rolled_back_txns = $attempted - $committed_txns;
my $rolled_back_events = $ids_drawn - $events - $ghosts;

note sprintf(
	"publishing: %d transactions attempted by %d clients, %d committed, "
	  . "%d rolled back; %d events committed, %d ghost events in rolled-back "
	  . "savepoints, %d events of rolled-back transactions; %.1f s",
	$attempted, $publishers, $committed_txns, $rolled_back_txns, $events,
	$ghosts, $rolled_back_events, $pub_secs);
note sprintf(
	"consuming: %d non-empty batches, %d rounds during publishing, "
	  . "%d drain rounds; %.1f s from first publish to drained",
	$batches, $consumer_rounds, $drain_rounds, $total_secs);

cmp_ok($events, '>=', $target, "at least $target events committed");
cmp_ok($rolled_back_txns, '>', 0, 'some publishing transactions rolled back');
cmp_ok($ghosts, '>', 0, 'some committed transactions rolled back a savepoint');

# Rows of a list query, for diagnostics.
sub rows
{
	my ($sql) = @_;
	return $node->safe_psql('postgres', $sql);
}

for my $sub (@subs)
{
	my ($n, $distinct) = split /\|/,
	  rows("SELECT count(*), count(DISTINCT id) FROM consumed WHERE sub = '$sub'");
	is($n, $events, "$sub: as many consumed as committed");
	is($distinct, $n, "$sub: no event consumed twice")
	  or diag "duplicates (id, times, markers):\n"
	  . rows(
		"SELECT id, count(*), string_agg(marker || '/' || k, ',') FROM consumed
		 WHERE sub = '$sub' GROUP BY id HAVING count(*) > 1 ORDER BY id LIMIT 20");

	# every committed event, identified by (marker, k), exactly once
	my $expected = q{
		SELECT c.marker, k FROM committed c, generate_series(1, c.n) k};
	my $got = "SELECT marker, k FROM consumed WHERE sub = '$sub'";
	is(rows("SELECT count(*) FROM ($expected EXCEPT $got) x"),
		0, "$sub: every committed event consumed")
	  or diag "lost (marker, k):\n"
	  . rows("$expected EXCEPT $got ORDER BY 1, 2 LIMIT 20");
	is(rows("SELECT count(*) FROM ($got EXCEPT $expected) x"),
		0, "$sub: nothing consumed that was not committed")
	  or diag "extra (marker, k):\n"
	  . rows("$got EXCEPT $expected ORDER BY 1, 2 LIMIT 20");
	is( rows(
			"SELECT count(*) FROM consumed WHERE sub = '$sub'
			 AND (etype <> 'stress.event'
				  OR marker NOT IN (SELECT marker FROM committed))"),
		0,
		"$sub: no event of a rolled-back transaction or savepoint consumed"
	) or diag "rolled-back events consumed (id, type, marker):\n"
	  . rows(
		"SELECT id, etype, marker FROM consumed WHERE sub = '$sub'
		 AND (etype <> 'stress.event'
			  OR marker NOT IN (SELECT marker FROM committed)) ORDER BY id LIMIT 20");
	is(rows("SELECT count(*) FROM consumed WHERE sub = '$sub' AND attempt <> 1"),
		0, "$sub: every event delivered at its first attempt");

	my ($claimed, $acked, $short) = split /\|/,
	  rows(
		"SELECT sum(claimed), sum(acked), count(*) FILTER (WHERE claimed <> acked)
		 FROM claims WHERE sub = '$sub'");
	is($acked, $claimed, "$sub: ack acknowledged every claimed event");
	is($short, 0, "$sub: no batch acked short");

	my ($pending, $leased, $retries, $dead, $delivered, $acked_total) =
	  split /\|/,
	  rows(
		"SELECT pending, leased, scheduled_retries, dead, delivered_total, acked_total
		 FROM eventbox.stats WHERE subscription = '$sub'");
	is($pending, 0, "$sub: stats show nothing pending");
	is($leased, 0, "$sub: stats show nothing leased");
	is($retries, 0, "$sub: stats show no scheduled retries");
	is($dead, 0, "$sub: stats show no dead letters");
	is($delivered, $events, "$sub: stats count every event delivered once");
	is($acked_total, $events, "$sub: stats count every event acked");
}

# G5: per aggregate, events were consumed in id order, which the publishers'
# advisory locks make the commit order.
my $inversions = q{
	SELECT agg, prev, id, prev_seq, seq FROM (
		SELECT agg, id, seq, lag(id) OVER w AS prev, lag(seq) OVER w AS prev_seq
		FROM consumed WHERE sub = '%s'
		WINDOW w AS (PARTITION BY agg ORDER BY seq)) s
	WHERE prev > id};
is(rows(sprintf("SELECT count(*) FROM ($inversions) x", 'ordered')),
	0, 'ordered: each aggregate consumed in commit order')
  or diag "out of order (agg, earlier id, later id, their seqs):\n"
  . rows(sprintf("$inversions ORDER BY agg, seq LIMIT 20", 'ordered'));

# G5: an aggregate is never leased to two claims at once.  Claims ack in
# the claiming transaction, so the next claim of an aggregate can only come
# after the previous one committed: each claim's rows of an aggregate form
# one unbroken run in consumption order.
is( rows(
		q{
	SELECT (SELECT count(*) FROM (
				SELECT xid, lag(xid) OVER (PARTITION BY agg ORDER BY seq) AS p
				FROM consumed WHERE sub = 'ordered') s
			WHERE p IS DISTINCT FROM xid)
		 - (SELECT count(*) FROM (SELECT DISTINCT agg, xid FROM consumed
								  WHERE sub = 'ordered') d)}),
	0,
	'ordered: claims of one aggregate never interleave');

# For contrast: how often the unordered subscription delivered an
# aggregate's events out of id order (allowed there).
note 'plain: '
  . rows(sprintf("SELECT count(*) FROM ($inversions) x", 'plain'))
  . ' per-aggregate order inversions (allowed without ordering)';

$node->stop;
note sprintf("test took %.1f s", time - $started);

done_testing();
