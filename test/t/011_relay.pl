# Copyright (c) eventbox contributors

# 011_relay.pl: eventbox relay nats against a real nats-server -js, started
# here on 127.0.0.1 with free ports and a temporary store directory.
#
# - 10,000 events arrive in the stream exactly once (message count and
#   distinct Nats-Msg-Id, read back from the stream), with the headers and
#   payload published; every event is acked in PostgreSQL.
# - kill -9 of the relay in the middle of 10,000 more, then a restart: still
#   exactly once in the stream (the duplicate window drops the re-published
#   events whose ack was lost), nothing left pending or leased; SIGTERM ends
#   the restarted relay cleanly with exit 0.
# - NATS stopped while the relay runs and events keep coming: nothing is
#   acked meanwhile; once NATS is back the relay resumes on its own and
#   every event ends in the stream exactly once.
# - PostgreSQL restarted while the relay runs: the relay reconnects (and
#   listens again) by itself and relays what was published since, each
#   event once in the stream.
# - events that cannot be stored (no stream for their subject) are nacked
#   with the NATS error and end in the dead letters; nothing else is acked.
# - an ordered subscription of 50,000 events, relay killed -9 four times
#   mid-run: each event exactly once in the stream, every aggregate's events
#   in publish order.
#
# The stream is read with test/t/nats_tool.py, a small client of the NATS
# protocol (no Python NATS library is installed).

use strict;
use warnings;

use Cwd qw(abs_path);
use File::Basename qw(dirname);
use IPC::Run;
use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep time);

my $cli = -x 'src/cli/eventbox' ? abs_path('src/cli/eventbox') : 'eventbox';
my $tool = abs_path(dirname(__FILE__) . '/nats_tool.py');
my ($nats_server) = grep { -x $_ } ('/usr/sbin/nats-server', '/usr/bin/nats-server');
plan skip_all => 'nats-server is not installed' unless $nats_server;
my $json = JSON::PP->new->utf8->canonical;

# --- nats-server on loopback -------------------------------------------------
my $nport = PostgreSQL::Test::Cluster::get_free_port();
my $mport = PostgreSQL::Test::Cluster::get_free_port();
my $store = PostgreSQL::Test::Utils::tempdir;
my $nlog = "$store/nats.log";
my $nats = IPC::Run::start(
	[ $nats_server, '-js', '-a', '127.0.0.1', '-p', $nport, '-m', $mport, '-sd', "$store/js" ],
	'<', \undef, '>', $nlog, '2>&1');
my $url = "nats://127.0.0.1:$nport";

sub tool
{
	my ($out, $err) = ('', '');
	IPC::Run::run([ 'python3', $tool, '--url', $url, @_ ], '<', \undef, '>', \$out, '2>', \$err,
		IPC::Run::timeout(180));
	return ($? >> 8, $out, $err);
}

# Create the stream once the server answers.  Duplicate window 10 minutes:
# longer than the lease (3 s) plus the backoff (at most 2 s) used below.
my $deadline = time + 60;
my ($rc, $out, $err);
do
{
	usleep(100_000);
	($rc, $out, $err) = tool('create-stream', 'EVENTS', 'eb.order.>', 600);
} while ($rc != 0 && time < $deadline);
is($rc, 0, 'nats-server -js is up and stream EVENTS (eb.order.>) created') or diag $err;

# --- PostgreSQL ----------------------------------------------------------------
my $node = PostgreSQL::Test::Cluster->new('relay');
$node->init;
$node->append_conf(
	'postgresql.conf', qq{
shared_preload_libraries = 'eventbox'
fsync = off
});
$node->start;
$node->safe_psql(
	'postgres', q{
CREATE EXTENSION eventbox;
SELECT eventbox.subscribe('to_nats', '{order.*}', lease => '3 seconds',
                          backoff_base => '100ms', backoff_max => '2s', start_at => 'now');
SELECT eventbox.subscribe('to_nats_dl', '{user.*}', max_attempts => 1, start_at => 'now');
});
my $conn = sprintf('host=%s port=%s dbname=postgres', $node->host, $node->port);

sub stats
{
	my ($sub) = @_;
	my $r = $node->safe_psql('postgres',
		"SELECT pending, leased, scheduled_retries, dead, acked_total FROM eventbox.stats WHERE subscription = '$sub'");
	return [ split /\|/, $r ];
}

sub stream
{
	my ($c, $o, $e) = tool('check', 'EVENTS');
	die "nats_tool check failed: $e" if $c;
	return $json->decode($o);
}

sub publish_orders
{
	my ($type, $n) = @_;
	$node->safe_psql('postgres', qq{
SELECT count(*) FROM eventbox.publish_batch((
  SELECT jsonb_agg(jsonb_build_object('event_type', '$type', 'payload', jsonb_build_object('n', g),
                   'aggregate_type', 'order', 'aggregate_id', g::text,
                   'headers', jsonb_build_object('trace', 't-' || g)))
  FROM generate_series(1, $n) g))});
}

my @relay = ($cli, '-d', $conn, 'relay', 'nats', '--nats-url', $url, '--prefix', 'eb');

# --- 1. 10,000 events, exactly once ------------------------------------------
publish_orders('order.created', 10000);
my ($rout, $rerr) = ('', '');
my $t0 = time;
IPC::Run::run([ @relay, '-s', 'to_nats', '--exit-when-idle' ], '<', \undef, '>', \$rout, '2>', \$rerr,
	IPC::Run::timeout(180));
my $secs = time - $t0;
is($? >> 8, 0, 'relay --exit-when-idle relays everything and exits 0') or diag $rerr;
note(sprintf('relayed 10000 events in %.2f s (%.0f events/s)', $secs, 10000 / $secs));
my $s = stream();
is($s->{messages}, 10000, '10,000 messages in the stream');
is($s->{distinct}, 10000, '10,000 distinct Nats-Msg-Id');
is($s->{missing_id}, 0, 'every message has a Nats-Msg-Id');
is_deeply(stats('to_nats'), [ 0, 0, 0, 0, 10000 ], 'all 10,000 acked, nothing pending or leased');

my $first = $s->{first};
my ($eid, $occ) = split /\|/, $node->safe_psql('postgres',
	"SELECT event_id, to_json(occurred_at)#>>'{}' FROM eventbox.event($first->{headers}{'Eventbox-Id'})");
is($first->{subject}, 'eb.order.created', 'subject is <prefix>.<event_type>');
is($first->{headers}{'Nats-Msg-Id'}, $eid, 'Nats-Msg-Id is the event_id');
is($first->{headers}{'Eventbox-Event-Type'}, 'order.created', 'Eventbox-Event-Type header');
is($first->{headers}{'Eventbox-Aggregate-Type'}, 'order', 'Eventbox-Aggregate-Type header');
is($first->{headers}{'Eventbox-Occurred-At'}, $occ, 'Eventbox-Occurred-At header');
my $n = $json->decode($first->{data})->{n};
is($first->{headers}{'Eventbox-Aggregate-Id'}, $n, 'Eventbox-Aggregate-Id header');
is_deeply($json->decode($first->{headers}{'Eventbox-Headers'}), { trace => "t-$n" },
	'Eventbox-Headers carries the event headers');
is_deeply($json->decode($first->{data}), { n => $n }, 'message data is the payload');

# --- 2. kill -9 in the middle, restart: still exactly once -------------------
# To kill the relay at the worst moment (JetStream stored a batch, PostgreSQL
# has not acked it), a session locks eventbox.batches, which eventbox.ack
# must update: the relay's next ack waits on the lock after its PubAcks.  If
# the claim is what waits, the lock is released and taken again.
publish_orders('order.updated', 10000);
($rout, $rerr) = ('', '');
my $h = IPC::Run::start([ @relay, '-s', 'to_nats', '--batch-size', '200' ],
	'<', \undef, '>', \$rout, '2>', \$rerr);
my $locker = $node->background_psql('postgres');
my $caught = 0;
$deadline = time + 120;
while (!$caught && time < $deadline)
{
	usleep(50_000);
	$locker->query_safe('BEGIN');
	$locker->query_safe('LOCK TABLE eventbox.batches IN EXCLUSIVE MODE');
	my $waiting = '';
	for (1 .. 100)
	{
		$waiting = $node->safe_psql('postgres', q{
SELECT query FROM pg_stat_activity
WHERE application_name = 'eventbox relay' AND wait_event_type = 'Lock'});
		last if $waiting;
		usleep(10_000);
	}
	if ($waiting =~ /eventbox\.ack\(/)
	{
		$h->signal('KILL');
		$h->finish;
		# The relay's backend would still run its ack once the lock is
		# released; a relay killed while its ack is on the wire can end
		# either way, this test wants the ack lost.
		$node->safe_psql('postgres', q{
SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'eventbox relay'});
		$caught = 1;
	}
	$locker->query_safe('ROLLBACK');
}
$locker->quit;
ok($caught, 'relay killed with -9 after its PubAcks, before its ack in PostgreSQL');
my ($c, $o) = tool('count', 'EVENTS');
chomp $o;
my $acked_at_kill = stats('to_nats')->[4];
note("at kill: $o messages in the stream, $acked_at_kill acked");
cmp_ok($o - $acked_at_kill, '>', 0, 'the stream holds events PostgreSQL has not acked');

($rout, $rerr) = ('', '');
$h = IPC::Run::start([ @relay, '-s', 'to_nats', '--batch-size', '200' ],
	'<', \undef, '>', \$rout, '2>', \$rerr);
ok( $node->poll_query_until(
		'postgres', q{
SELECT pending = 0 AND leased = 0 AND scheduled_retries = 0 AND dead = 0 AND acked_total = 20000
FROM eventbox.stats WHERE subscription = 'to_nats'}),
	'restarted relay acks every event (the killed batch expired and was retried)');
$h->signal('TERM');
$h->finish;
is($? >> 8, 0, 'SIGTERM: the relay stops cleanly with exit 0');
like($rerr, qr/stopping: \d+ events stored in JetStream \((\d+) duplicates/, 'and reports its totals');
my ($dups) = $rerr =~ /\((\d+) duplicates dropped/;
cmp_ok($dups // 0, '>', 0, "the restarted relay published the unacked batch again ($dups duplicates dropped by the stream)");
$s = stream();
is($s->{messages}, 20000, 'after kill -9 and restart: 20,000 messages in the stream');
is($s->{distinct}, 20000, '... 20,000 distinct Nats-Msg-Id: exactly once');

# --- 2b/2c. an outage while one relay runs: it resumes, nothing lost -------
# A relay on to_nats forwards $before events, then $break->() interrupts
# NATS or PostgreSQL, $during more events are published, $mend->() (if
# any) ends the outage; the same relay must ack everything and the stream
# hold each event once.  Returns the relay's log.
sub relay_through_outage
{
	my ($what, $before, $break, $during, $mend) = @_;
	my ($out, $err) = ('', '');
	my $acked = stats('to_nats')->[4];
	my $total = $acked + $before->[1] + $during->[1];
	my $h = IPC::Run::start([ @relay, '-s', 'to_nats', '--batch-size', '200' ],
		'<', \undef, '>', \$out, '2>', \$err);
	publish_orders(@$before);
	ok( $node->poll_query_until(
			'postgres', sprintf(q{
SELECT acked_total = %d FROM eventbox.stats WHERE subscription = 'to_nats'}, $acked + $before->[1])),
		"before $what: a running relay forwards new events");
	$break->();
	publish_orders(@$during);
	$mend->($acked + $before->[1]) if $mend;
	ok( $node->poll_query_until(
			'postgres', sprintf(q{
SELECT pending = 0 AND leased = 0 AND scheduled_retries = 0 AND dead = 0 AND acked_total = %d
FROM eventbox.stats WHERE subscription = 'to_nats'}, $total)),
		"after $what the same relay resumes and acks every event");
	$h->signal('TERM');
	$h->finish;
	is($? >> 8, 0, "the relay that lived through $what stops cleanly");
	my $st = stream();
	is($st->{messages}, $total, "after $what: $total messages in the stream");
	is($st->{distinct}, $total, "... $total distinct Nats-Msg-Id: exactly once");
	return $err;
}

relay_through_outage(
	'the NATS outage',
	[ 'order.updated', 3000 ],
	sub { $nats->signal('TERM'); $nats->finish; },
	[ 'order.shipped', 3000 ],
	sub {
		my ($acked) = @_;
		sleep 3;
		is(stats('to_nats')->[4], $acked, 'nothing is acked while NATS is down');
		$nats = IPC::Run::start(
			[ $nats_server, '-js', '-a', '127.0.0.1', '-p', $nport, '-m', $mport, '-sd', "$store/js" ],
			'<', \undef, '>>', $nlog, '2>&1');
	});

# PostgreSQL's fast restart ends the relay's session; it reconnects and
# listens again by itself.
$rerr = relay_through_outage(
	'the PostgreSQL restart',
	[ 'order.paid', 1000 ],
	sub { $node->restart; },
	[ 'order.refunded', 2000 ]);
like($rerr, qr/lost the connection to PostgreSQL; reconnecting/,
	'... and it noticed the lost connection');

# --- 3. no stream for the subject: dead letters with the NATS error ---------
$node->safe_psql('postgres', q{
SELECT eventbox.publish('user.created', jsonb_build_object('n', g)) FROM generate_series(1, 3) g});
($rout, $rerr) = ('', '');
IPC::Run::run([ @relay, '-s', 'to_nats_dl', '--exit-when-idle' ], '<', \undef, '>', \$rout, '2>', \$rerr,
	IPC::Run::timeout(180));
is($? >> 8, 0, 'relay of unpublishable events exits 0');
is_deeply(stats('to_nats_dl'), [ 0, 0, 0, 3, 0 ], 'all 3 dead-lettered, none acked');
my $errs = $node->safe_psql('postgres',
	q{SELECT string_agg(DISTINCT last_error, ' / ') FROM eventbox.dead_letters WHERE subscription = 'to_nats_dl'});
like($errs, qr/NATS publish to subject "eb\.user\.created" failed: No responders/i,
	'last_error is the NATS error');
like($errs, qr/no JetStream stream stores this subject/, '... with what it means');
is(stream()->{messages}, 29000, 'the stream holds nothing more');

# --- 4. ordered subscription, 50,000 events, relay killed -9 repeatedly ------
# Events of 100 aggregates; within an aggregate, payload n grows with the
# publish order.  The relay is killed four times mid-run (its backend too),
# then a last relay finishes once the killed batches' leases have expired.
($rc, $out, $err) = tool('create-stream', 'ORD', 'ebo.>', 600);
is($rc, 0, 'stream ORD (ebo.>) created') or diag $err;
$node->safe_psql('postgres', q{
SELECT eventbox.subscribe('to_nats_ord', event_types => '{seq.*}', ordering => 'aggregate',
                          lease => '3 seconds', backoff_base => '100 ms', backoff_max => '1 second')});
for my $chunk (0 .. 4)
{
	my $base = $chunk * 10000;
	$node->safe_psql('postgres', qq{
SELECT count(*) FROM eventbox.publish_batch((
  SELECT jsonb_agg(jsonb_build_object('event_type', 'seq.step', 'payload', jsonb_build_object('n', $base + g),
                   'aggregate_type', 'acct', 'aggregate_id', (($base + g) % 100)::text) ORDER BY g)
  FROM generate_series(1, 10000) g))});
}
my @ord = ($cli, '-d', $conn, 'relay', 'nats', '--nats-url', $url, '--prefix', 'ebo',
	'-s', 'to_nats_ord', '--batch-size', '500');
my $stored = 0;
for my $k (1 .. 4)
{
	my ($ko, $ke) = ('', '');
	my $kh = IPC::Run::start(\@ord, '<', \undef, '>', \$ko, '2>', \$ke);
	# kill it mid-run: once it has stored at least 1,000 more events
	my $until = time + 120;
	my $now = $stored;
	while ($now < $stored + 1000 && time < $until)
	{
		usleep(50_000);
		my ($cc, $co) = tool('count', 'ORD');
		chomp $co;
		$now = $co if $cc == 0 && $co =~ /^\d+$/;
	}
	$stored = $now;
	usleep(int(rand(200_000)));
	$kh->signal('KILL');
	$kh->finish;
	$node->safe_psql('postgres', q{
SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'eventbox relay'});
}
my $killed_at = stats('to_nats_ord')->[4];
note("after 4 kills: $stored+ stored, $killed_at of 50000 acked");
cmp_ok($stored, '>=', 4000, 'each killed relay had stored events when it was killed');
($rout, $rerr) = ('', '');
$h = IPC::Run::start(\@ord, '<', \undef, '>', \$rout, '2>', \$rerr);
ok( $node->poll_query_until(
		'postgres', q{
SELECT pending = 0 AND leased = 0 AND scheduled_retries = 0 AND dead = 0 AND acked_total = 50000
FROM eventbox.stats WHERE subscription = 'to_nats_ord'}),
	'after four kill -9s a last relay acks all 50,000 events');
$h->signal('TERM');
$h->finish;
my ($oc, $oo, $oe) = tool('check', 'ORD');
my $ord_s = $json->decode($oo);
is($ord_s->{messages}, 50000, '50,000 messages in stream ORD');
is($ord_s->{distinct}, 50000, '... each exactly once (distinct Nats-Msg-Id)');
is($ord_s->{order_violations}, 0, '... and every aggregate\'s events in publish order');

$node->stop;
$nats->signal('TERM');
$nats->finish;
done_testing();
