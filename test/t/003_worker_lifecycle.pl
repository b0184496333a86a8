# Copyright (c) eventbox contributors

# 003_worker_lifecycle.pl: the launcher and the database workers over the
# life of a server.
#
# - CREATE EXTENSION in a new database gets it a worker without a restart;
#   DROP EXTENSION makes the worker exit; CREATE EXTENSION brings it back.
# - DROP DATABASE (without FORCE) and ALTER DATABASE RENAME of a database
#   whose worker runs succeed; the dropped database's worker is gone, the
#   renamed one gets its worker back.
# - a database without the extension gets no lasting worker (only a probe);
#   template databases are never connected to, even with the extension
#   installed in template1 (and CREATE DATABASE from it keeps working).
# - SIGTERM stops a worker cleanly (exit code 0, no crash restart); the
#   launcher starts a new one, which delivers.
# - SIGHUP with eventbox.enabled = off stops the worker and delivery; on
#   again, the events published meanwhile are delivered, none lost.
# - a listener stuck in an open transaction makes no publisher fail or
#   wait; once it commits it receives what was published meanwhile.
# - on a hot standby no launcher or worker runs; after promotion they start,
#   deliver new events, and what the old primary published and no pull
#   consumer claimed is claimable on the promoted node.
#
# log_min_messages = debug1 makes the postmaster log each background
# worker it starts (with the database name) and each exit code.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use EventboxListener;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my $node = PostgreSQL::Test::Cluster->new('life');
$node->init;
$node->append_conf(
	'postgresql.conf', qq{
shared_preload_libraries = 'eventbox'
eventbox.naptime = '200ms'
log_min_messages = debug1
fsync = off
# a publisher that blocks fails the run instead of hanging it
statement_timeout = '60s'
});
$node->start;

# The pids of the eventbox workers connected to $db (sorted, comma-separated).
sub workers
{
	my ($n, $db) = @_;
	return $n->safe_psql(
		'postgres', qq{
SELECT coalesce(string_agg(pid::text, ',' ORDER BY pid), '')
FROM pg_stat_activity WHERE backend_type = 'eventbox worker' AND datname = '$db'});
}

# Wait until exactly one worker serves $db; returns its pid.
sub wait_worker
{
	my ($n, $db, $what) = @_;
	ok( $n->poll_query_until(
			'postgres', qq{
SELECT count(*) = 1 FROM pg_stat_activity
WHERE backend_type = 'eventbox worker' AND datname = '$db'}),
		$what);
	return workers($n, $db);
}

# Wait until no worker serves $db.
sub wait_no_worker
{
	my ($n, $db, $what) = @_;
	ok( $n->poll_query_until(
			'postgres', qq{
SELECT count(*) = 0 FROM pg_stat_activity
WHERE backend_type = 'eventbox worker' AND datname = '$db'}),
		$what);
	return;
}

# Eventbox backends connected to a template database, seen now.
my $template_sightings = 0;

sub look_for_templates
{
	$template_sightings += $node->safe_psql(
		'postgres', q{
SELECT count(*) FROM pg_stat_activity a JOIN pg_database d ON d.oid = a.datid
WHERE a.backend_type LIKE 'eventbox%' AND (d.datistemplate OR NOT d.datallowconn)});
	return;
}

# How many times the postmaster started an eventbox worker for $db.
sub worker_starts
{
	my ($n, $db) = @_;
	my @m = slurp_file($n->logfile) =~
	  /starting background worker process "eventbox worker for database \Q$db\E"/g;
	return scalar @m;
}

$node->safe_psql('postgres', 'CREATE EXTENSION eventbox');
my $pg_worker = wait_worker($node, 'postgres', 'worker for database postgres starts');
my $pg_starts = worker_starts($node, 'postgres');

# ---------------------------------------------------------------------------
# CREATE / DROP EXTENSION without restart
# ---------------------------------------------------------------------------

$node->safe_psql('postgres', 'CREATE DATABASE db1');
$node->safe_psql('db1', 'CREATE EXTENSION eventbox');
my $w1 = wait_worker($node, 'db1', 'CREATE EXTENSION in a new database starts its worker');
look_for_templates();

$node->safe_psql('db1', 'DROP EXTENSION eventbox');
wait_no_worker($node, 'db1', 'DROP EXTENSION makes the worker exit');

$node->safe_psql('db1', 'CREATE EXTENSION eventbox');
my $w1b = wait_worker($node, 'db1', 'CREATE EXTENSION again brings the worker back');
isnt($w1b, $w1, 'it is a new worker process');

# the worker of db1 delivers
{
	my $l = EventboxListener->start($node, 'db1', ['eventbox']);
	my $id = $node->safe_psql('db1', q{SELECT eventbox.publish('db1.ev', '{"x": 1}')});
	$l->wait_for(sub { grep { ($_->{msg}{id} // 0) == $id } @_ },
		'the new worker of db1 delivers');
	$l->stop;
}

# ---------------------------------------------------------------------------
# DROP DATABASE and ALTER DATABASE RENAME with a running worker
# ---------------------------------------------------------------------------

is(workers($node, 'db1'), $w1b, 'worker of db1 runs before DROP DATABASE');
my ($rc, $out, $err) = $node->psql('postgres', 'DROP DATABASE db1');
is($rc, 0, 'DROP DATABASE (without FORCE) of a database with a running worker succeeds')
  or diag $err;
is( $node->safe_psql(
		'postgres', qq{
SELECT count(*) FROM pg_stat_activity a
WHERE a.backend_type = 'eventbox worker'
  AND (a.pid = $w1b OR NOT EXISTS (SELECT FROM pg_database d WHERE d.oid = a.datid))}),
	'0',
	'the dropped database has no worker');

$node->safe_psql('postgres', 'CREATE DATABASE db2');
$node->safe_psql('db2', 'CREATE EXTENSION eventbox');
my $w2 = wait_worker($node, 'db2', 'worker for db2 starts');
($rc, $out, $err) = $node->psql('postgres', 'ALTER DATABASE db2 RENAME TO db3');
is($rc, 0, 'ALTER DATABASE RENAME of a database with a running worker succeeds')
  or diag $err;
wait_worker($node, 'db3', 'the renamed database gets its worker back');

# ---------------------------------------------------------------------------
# Databases without the extension; template databases
# ---------------------------------------------------------------------------

$node->safe_psql('postgres', 'CREATE DATABASE plain');
# the launcher probes it (within its 10 s pass) ...
my $probed = 0;
for (1 .. 600)
{
	$probed = 1
	  if slurp_file($node->logfile) =~
	  /starting background worker process "eventbox worker for database plain"/;
	last if $probed;
	look_for_templates();
	usleep(100_000);
}
ok($probed, 'the launcher probes a new database without the extension');
wait_no_worker($node, 'plain', 'the probe of a database without the extension exits');
usleep(1_000_000);
is(workers($node, 'plain'), '', 'no worker lasts in a database without the extension');

# The extension in template1: the launcher must still never connect there
# (a connection would also make CREATE DATABASE fail: "source database
# template1 is being accessed by other users").
$node->safe_psql('template1', 'CREATE EXTENSION eventbox');
for (1 .. 20)
{
	look_for_templates();
	usleep(100_000);
}
($rc, $out, $err) = $node->psql('postgres', 'CREATE DATABASE fromtpl TEMPLATE template1');
is($rc, 0, 'CREATE DATABASE from template1 with the extension installed works') or diag $err;
wait_worker($node, 'fromtpl',
	'a database created from a template with the extension gets a worker');
look_for_templates();
$node->safe_psql('template1', 'DROP EXTENSION eventbox');

# Meanwhile the worker of postgres ran all along: the launcher had no reason
# to start another one there.
is(workers($node, 'postgres'), $pg_worker,
	'the worker of postgres is still the first one, and the only one');
is(worker_starts($node, 'postgres') - $pg_starts,
	0, 'the launcher started no other worker for postgres while its worker ran');

is($template_sightings, 0, 'no eventbox process was seen connected to a template database');
unlike(
	slurp_file($node->logfile),
	qr/starting background worker process "eventbox worker for database template/,
	'no eventbox worker was ever started for template0 or template1');

# ---------------------------------------------------------------------------
# SIGTERM
# ---------------------------------------------------------------------------

my $all = EventboxListener->start($node, 'postgres', ['eventbox']);
$node->safe_psql('postgres', "SELECT pg_terminate_backend($pg_worker)");
ok( $node->poll_query_until(
		'postgres', qq{
SELECT count(*) = 1 FROM pg_stat_activity
WHERE backend_type = 'eventbox worker' AND datname = 'postgres' AND pid <> $pg_worker}),
	'after SIGTERM the launcher starts a new worker');
ok( $node->poll_query_until(
		'postgres', "SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = $pg_worker"),
	'the terminated worker is gone');
my $pg_worker2 = workers($node, 'postgres');
isnt($pg_worker2, $pg_worker, 'new worker has a different pid');
ok( $node->wait_for_log(
		qr/background worker "eventbox worker" \(PID $pg_worker\) exited with exit code 0/),
	'the terminated worker exited cleanly (exit code 0)');
my $id = $node->safe_psql('postgres', q{SELECT eventbox.publish('term.ev', '{"t": 1}')});
$all->wait_for(sub { grep { ($_->{msg}{id} // 0) == $id } @_ },
	'the new worker delivers');
ok((grep { ($_->{msg}{id} // 0) == $id } $all->messages), 'delivered after SIGTERM');

# ---------------------------------------------------------------------------
# SIGHUP: eventbox.enabled
# ---------------------------------------------------------------------------

$node->safe_psql('postgres', 'ALTER SYSTEM SET eventbox.enabled = off');
$node->reload;
wait_no_worker($node, 'postgres', 'eventbox.enabled = off + reload: the worker exits');
my $hup_ids = $node->safe_psql(
	'postgres', q{
SELECT string_agg(eventbox.publish('hup.ev', jsonb_build_object('i', i))::text, ',' ORDER BY i)
FROM generate_series(1, 5) i});
for my $i (1 .. 3)
{
	$node->safe_psql('postgres', qq{SELECT eventbox.publish('hup.ev', '{"i": 10$i}')});
}
usleep(1_500_000);
is(scalar($all->matching(sub { ($_->{event_type} // '') eq 'hup.ev' })),
	0, 'while disabled nothing is delivered');
is(workers($node, 'postgres'), '', 'while disabled no worker runs');

$node->safe_psql('postgres', 'ALTER SYSTEM SET eventbox.enabled = on');
$node->reload;
wait_worker($node, 'postgres', 'eventbox.enabled = on + reload: a worker starts');
my @hup = $all->wait_for(
	sub { (grep { ($_->{msg}{event_type} // '') eq 'hup.ev' } @_) >= 8 },
	'the events published while disabled are delivered');
is_deeply(
	[ sort { $a <=> $b } map { $_->{msg}{payload}{i} } grep { ($_->{msg}{event_type} // '') eq 'hup.ev' } @hup ],
	[ 1, 2, 3, 4, 5, 101, 102, 103 ],
	'each event published while disabled is delivered once after re-enabling');
$all->stop;

# ---------------------------------------------------------------------------
# A listener stuck in an open transaction
# ---------------------------------------------------------------------------

my $stuck = EventboxListener->start($node, 'postgres', ['eventbox'], stuck => 1);
is( $node->safe_psql(
		'postgres',
		"SELECT state FROM pg_stat_activity WHERE pid = " . $stuck->backend_pid),
	'idle in transaction',
	'the stuck listener is idle in transaction');
$node->pgbench(
	'--no-vacuum --client=4 --jobs=4 --transactions=500',
	0,
	[ qr{processed: 2000/2000}, qr{number of failed transactions: 0} ],
	[qr{^$}],
	'2,000 publishing transactions all succeed while a listener is stuck',
	{
		'eventbox_stuck_publish' =>
		  q{SELECT eventbox.publish('stuck.ev', jsonb_build_object('c', :client_id));}
	},
	'postgres');
$stuck->release;
my @st = $stuck->wait_for(
	sub { (grep { ($_->{msg}{event_type} // '') eq 'stuck.ev' } @_) >= 2000 },
	'the stuck listener, once committed, receives the 2,000 events');
my %seen = map { $_->{msg}{id} => 1 } grep { ($_->{msg}{event_type} // '') eq 'stuck.ev' } @st;
is(scalar(keys %seen), 2000, 'it receives each of the 2,000 events');
$stuck->stop;

unlike(
	slurp_file($node->logfile),
	qr/terminating any other active server processes|was terminated by signal/,
	'no crash or crash restart happened');
$node->stop;

# ---------------------------------------------------------------------------
# Hot standby and promotion
# ---------------------------------------------------------------------------

my $primary = PostgreSQL::Test::Cluster->new('primary');
$primary->init(allows_streaming => 1);
$primary->append_conf(
	'postgresql.conf', qq{
shared_preload_libraries = 'eventbox'
eventbox.naptime = '200ms'
fsync = off
});
$primary->start;
$primary->safe_psql(
	'postgres', q{
CREATE EXTENSION eventbox;
SELECT eventbox.subscribe('pullsub', '{ha.*}');
});
wait_worker($primary, 'postgres', 'primary: worker starts');
$primary->backup('bkp');
my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'bkp', has_streaming => 1);
$standby->start;

my $pre = $primary->safe_psql(
	'postgres', q{
SELECT string_agg(eventbox.publish('ha.pre', jsonb_build_object('i', i))::text, ',' ORDER BY i)
FROM generate_series(1, 3) i});
# one of them claimed and acked on the primary: not to be claimed again
my ($claimed, $acked) = split /\|/, $primary->safe_psql(
	'postgres', q{
CREATE TEMP TABLE c AS SELECT * FROM eventbox.claim_batch(1, 'pullsub');
SELECT id, eventbox.ack(id, 'pullsub', lease) FROM c;
});
is($acked, 't', 'primary: one event claimed and acked');
$primary->wait_for_catchup($standby);

is($standby->safe_psql('postgres', 'SELECT pg_is_in_recovery()'), 't', 'standby is in recovery');
my $seen_on_standby = 0;
for (1 .. 30)
{
	$seen_on_standby += $standby->safe_psql('postgres',
		q{SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE 'eventbox%'});
	usleep(100_000);
}
is($seen_on_standby, 0, 'no eventbox launcher or worker runs on the standby in recovery');

$primary->stop;
$standby->promote;
is($standby->safe_psql('postgres', 'SELECT pg_is_in_recovery()'), 'f', 'standby promoted');
ok( $standby->poll_query_until(
		'postgres',
		q{SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'eventbox launcher'}),
	'promoted: the launcher starts');
wait_worker($standby, 'postgres', 'promoted: the worker starts');

my $pl = EventboxListener->start($standby, 'postgres', ['eventbox']);
my $post = $standby->safe_psql('postgres', q{SELECT eventbox.publish('ha.post', '{"p": 1}')});
$pl->wait_for(sub { grep { ($_->{msg}{id} // 0) == $post } @_ },
	'promoted: an event published after promotion is delivered to a listener');
ok((grep { ($_->{msg}{id} // 0) == $post } $pl->messages),
	'promoted: delivered on channel eventbox');
$pl->stop;

my @unclaimed = grep { $_ ne $claimed } split /,/, $pre;
is( $standby->safe_psql(
		'postgres', q{
CREATE TEMP TABLE c AS SELECT * FROM eventbox.claim_batch(100, 'pullsub');
SELECT string_agg(id || ':' || event_type, ',' ORDER BY id) FROM c;
SELECT sum(eventbox.ack(id, 'pullsub', lease)::int) FROM c;
}),
	join(',', (map { "$_:ha.pre" } @unclaimed), "$post:ha.post") . "\n3",
	'promoted: the unclaimed events of the old primary (and the new one) are claimable and ackable');
$standby->stop;

done_testing();
