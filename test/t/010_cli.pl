# Copyright (c) eventbox contributors

# 010_cli.pl: the eventbox command-line tool (src/cli/), end to end against a
# real server.
#
# - --help of the tool and of every subcommand; bad command lines exit 2.
# - an unreachable server exits 3 with a message that says what to check;
#   a database without the extension exits 1 and says CREATE EXTENSION.
# - stats: table and JSON output, --subscription, an unknown subscription.
# - tail: follows events live, --type filters, --json, a payload too big for
#   a notification is fetched with eventbox.event(id).
# - dead-letters list (filters by subscription, type, age), show, replay in
#   chunks with progress, replay interrupted by SIGINT (whole chunks only:
#   nothing half-done, the count adds up), purge.
#
# The tool under test is the one built in this tree (src/cli/eventbox), else
# the installed one.

use strict;
use warnings;

use Cwd qw(abs_path);
use IPC::Run;
use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep time);

my $cli = -x 'src/cli/eventbox' ? abs_path('src/cli/eventbox') : 'eventbox';
my $json = JSON::PP->new->utf8->canonical;

my $node = PostgreSQL::Test::Cluster->new('cli');
$node->init;
$node->append_conf(
	'postgresql.conf', qq{
shared_preload_libraries = 'eventbox'
fsync = off
});
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION eventbox');
my $conn = sprintf('host=%s port=%s dbname=postgres', $node->host, $node->port);

# Run the tool; returns (exit code, stdout, stderr).
sub run_cli
{
	my @args = @_;
	my ($out, $err) = ('', '');
	IPC::Run::run([ $cli, @args ], '<', \undef, '>', \$out, '2>', \$err,
		IPC::Run::timeout(120));
	return ($? >> 8, $out, $err);
}

# ---------------------------------------------------------------------------
# Help and usage errors
# ---------------------------------------------------------------------------

my ($rc, $out, $err) = run_cli('--help');
is($rc, 0, 'eventbox --help exits 0');
like($out, qr/Exit codes: 0 success, 1 error.*2 bad command line, 3 could not connect/s,
	'--help documents the exit codes');
for my $cmd ('stats', 'tail', 'dead-letters', 'relay nats')
{
	($rc, $out, $err) = run_cli(split(/ /, $cmd), '--help');
	is($rc, 0, "eventbox $cmd --help exits 0");
	like($out, qr/Usage:.*eventbox \Q$cmd\E/s, "eventbox $cmd --help shows its usage");
}

my @usage = (
	[ [], 'no command' ],
	[ ['frobnicate'], 'unknown command' ],
	[ [ 'stats', '--bogus' ], 'unknown option' ],
	[ [ 'stats', '--interval', 'x' ], 'bad --interval' ],
	[ [ 'stats', 'extra' ], 'extra argument' ],
	[ [ 'tail', '--count', '0' ], 'bad --count' ],
	[ ['dead-letters'], 'dead-letters without action' ],
	[ [ 'dead-letters', 'explode' ], 'unknown dead-letters action' ],
	[ [ 'dead-letters', 'show' ], 'show without id' ],
	[ [ 'dead-letters', 'show', 'abc' ], 'show with a bad id' ],
	[ [ 'dead-letters', 'replay' ], 'replay without --subscription' ],
	[ [ 'dead-letters', 'purge', '-s', 'x' ], 'purge without --older-than or --all' ],
	[ [ 'dead-letters', 'purge', '-s', 'x', '--all', '-t', 'a.*' ], 'purge with --type' ],
	[ [ 'relay', 'nats' ], 'relay without subscription' ],
	[ [ 'relay', 'kafka', '-s', 'x' ], 'relay to an unknown target' ],
	[ [ 'relay', 'nats', '-s', 'x', '--batch-size', '0' ], 'relay with a bad batch size' ],
	[ [ 'relay', 'nats', '-s', 'x', '--prefix', 'a.>' ], 'relay with a bad prefix' ]);
for my $u (@usage)
{
	($rc, $out, $err) = run_cli(@{ $u->[0] });
	is($rc, 2, "$u->[1]: exit 2");
	like($err, qr/Try "eventbox.*--help"/, "$u->[1]: says where to get help");
}
($rc, $out, $err) = run_cli('-d', $conn, 'dead-letters', 'list', '--older-than', 'banana');
is($rc, 2, 'dead-letters list with a malformed --older-than: exit 2');
like($err, qr/invalid --older-than "banana"/, '... naming the bad value');
# the server's rules for intervals, checked before anything is counted
foreach my $bad ([ '1 mon -40 days', qr/negative part/ ], [ '200 years', qr/at most 100 years/ ])
{
	($rc, $out, $err) =
	  run_cli('-d', $conn, 'dead-letters', 'purge', '-s', 'x', '--older-than', $bad->[0]);
	is($rc, 2, "dead-letters purge --older-than '$bad->[0]': exit 2");
	like($err, $bad->[1], '... saying why');
}

# ---------------------------------------------------------------------------
# Connection failures
# ---------------------------------------------------------------------------

my $free = PostgreSQL::Test::Cluster::get_free_port();
($rc, $out, $err) = run_cli('-d', "host=127.0.0.1 port=$free connect_timeout=5 dbname=postgres", 'stats');
is($rc, 3, 'unreachable server: exit 3');
like($err, qr/could not connect to the database/, '... says it could not connect');
like($err, qr/Hint: check that the server is running.*PGHOST/s, '... and what to check');

{
	local $ENV{PGHOST} = $node->host;
	local $ENV{PGPORT} = $free;
	($rc, $out, $err) = run_cli('tail');
	is($rc, 3, 'unreachable server from PGHOST/PGPORT: exit 3');
}

$node->safe_psql('postgres', 'CREATE DATABASE noext');
($rc, $out, $err) = run_cli('-h', $node->host, '-p', $node->port, '-d', 'noext', 'stats');
is($rc, 1, 'database without the extension: exit 1');
like($err, qr/extension eventbox is not installed.*CREATE EXTENSION eventbox/s,
	'... says to CREATE EXTENSION');

# ---------------------------------------------------------------------------
# stats
# ---------------------------------------------------------------------------

$node->safe_psql(
	'postgres', q{
SELECT eventbox.subscribe('billing', '{order.*}', start_at => 'beginning');
SELECT eventbox.publish('order.created', jsonb_build_object('n', g), 'order', g::text)
FROM generate_series(1, 3) g;
});
{
	local $ENV{PGHOST} = $node->host;
	local $ENV{PGPORT} = $node->port;
	local $ENV{PGDATABASE} = 'postgres';
	($rc, $out, $err) = run_cli('stats', '-i', '0.2');
}
is($rc, 0, 'stats (connection from PG* variables): exit 0');
like($out, qr/^SUBSCRIPTION\s+MODE\s+PENDING\s+LEASED\s+RETRYING\s+DEAD\s+LAG\s+LAG_S\s+PUB\/S\s+DELIV\/S\s+ACK\/S$/m,
	'stats prints the table header');
like($out, qr/^billing\s+pull\s+3\s+0\s+0\s+0\s+3\s/m, 'billing: 3 pending, lag 3');
like($out, qr/^default\s+push_once\s/m, 'the default subscription is listed');

($rc, $out, $err) = run_cli('-d', $conn, 'stats', '--json', '-s', 'billing', '-i', '0.2');
is($rc, 0, 'stats --json: exit 0');
my $st = eval { $json->decode($out) };
ok($st, 'stats --json prints one JSON object') or diag $out;
is(scalar @{ $st->{subscriptions} // [] }, 1, '--subscription selects one subscription');
my $b = $st->{subscriptions}[0];
is_deeply(
	[ @$b{qw(subscription mode pending leased scheduled_retries dead lag_events published_total)} ],
	[ 'billing', 'pull', 3, 0, 0, 0, 3, 3 ],
	'JSON carries the counts');
ok(defined $b->{published_per_second} && defined $b->{acked_per_second}, 'JSON carries rates');

($rc, $out, $err) = run_cli('-d', $conn, 'stats', '-s', 'nosuch', '-i', '0.2');
is($rc, 1, 'stats of an unknown subscription: exit 1');
like($err, qr/subscription "nosuch" does not exist/, '... saying so');

# --watch stops cleanly on SIGINT after printing samples
{
	my ($wout, $werr) = ('', '');
	my $h = IPC::Run::start([ $cli, '-d', $conn, 'stats', '--watch', '--json', '-i', '0.2' ],
		'<', \undef, '>', \$wout, '2>', \$werr);
	my $deadline = time + 60;
	while ((() = $wout =~ /\n/g) < 2 && time < $deadline)
	{
		$h->pump_nb;
		usleep(50_000);
	}
	$h->signal('INT');
	$h->finish;
	is($? >> 8, 0, 'stats --watch: SIGINT ends it with exit 0');
	cmp_ok(scalar(() = $wout =~ /^\{"time":/mg), '>=', 2, '--watch --json prints one object per sample');
}

# ---------------------------------------------------------------------------
# tail
# ---------------------------------------------------------------------------

# Start tail and wait until its LISTEN is in place.
sub start_tail
{
	my ($outref, $errref, @args) = @_;
	my $h = IPC::Run::start([ $cli, '-d', $conn, 'tail', @args ],
		'<', \undef, '>', $outref, '2>', $errref, IPC::Run::timeout(120));
	$node->poll_query_until('postgres', q{
SELECT count(*) > 0 FROM pg_stat_activity
WHERE backend_type = 'client backend' AND query LIKE 'LISTEN%' AND state = 'idle'})
	  or die 'tail did not start listening';
	return $h;
}

my ($tout, $terr) = ('', '');
my $th = start_tail(\$tout, \$terr, '--json', '-t', 'order.*', '-t', 'invoice.paid', '-n', '3');
$node->safe_psql(
	'postgres', q{
SELECT eventbox.publish('user.created', '{"skip": true}');
SELECT eventbox.publish('order.created', '{"id": 42, "note": "h\u00e9llo"}', 'order', '42',
                        '{"trace": "t-1"}');
SELECT eventbox.publish('order.shipped', jsonb_build_object('blob', repeat('x', 9000)), 'order', '42');
SELECT eventbox.publish('invoice.paid', '{"amount": 10}');
});
$th->finish;
is($? >> 8, 0, 'tail -n 3: exit 0 after three events');
my @ev = map { $json->decode($_) } grep { length } split /\n/, $tout;
is_deeply([ map { $_->{event_type} } @ev ], [qw(order.created order.shipped invoice.paid)],
	'tail --type follows matching events only, in order');
is_deeply($ev[0]{payload}, { id => 42, note => "h\x{e9}llo" }, 'payload intact');
is_deeply($ev[0]{headers}, { trace => 't-1' }, 'headers intact');
is(length($ev[1]{payload}{blob} // ''), 9000,
	'a payload too big for a notification is fetched with eventbox.event(id)');
ok(!exists $ev[1]{payload_omitted}, '... and the payload_omitted marker is dropped');
is($ev[0]{aggregate_id}, '42', 'envelope fields are there');

($tout, $terr) = ('', '');
$th = start_tail(\$tout, \$terr, '-n', '1');
my $id = $node->safe_psql('postgres',
	q{SELECT eventbox.publish('order.created', '{"a": 1}', 'order', '7')});
$th->finish;
like($tout, qr/^\S+ $id order\.created order:7 \{"a": 1\}$/m,
	'tail prints OCCURRED_AT ID TYPE AGGREGATE PAYLOAD');
like($terr, qr/listening on channel "eventbox"/, 'tail says where it listens');

($rc, $out, $err) = run_cli('-d', $conn, 'tail', '-s', 'billing');
is($rc, 1, 'tail of a subscription that sends only wake-ups: exit 1');
like($err, qr/does not forward events.*notify 'event' or 'envelope'/s, '... saying why');

# ---------------------------------------------------------------------------
# dead-letters
# ---------------------------------------------------------------------------

# 30 dead letters in subscription dl (25 job.run, 5 other.thing), 2 in dl2.
$node->safe_psql(
	'postgres', q{
SELECT eventbox.subscribe('dl', '{job.*,other.*}', max_attempts => 1, start_at => 'now');
SELECT eventbox.subscribe('dl2', '{job.*}', max_attempts => 1, start_at => 'now');
SELECT eventbox.publish(CASE WHEN g <= 25 THEN 'job.run' ELSE 'other.thing' END,
                        jsonb_build_object('n', g))
FROM generate_series(1, 30) g;
});
$node->safe_psql('postgres', q{
SELECT count(eventbox.nack(d.id, 'boom ' || d.id, NULL, 'dl', d.lease))
FROM eventbox.claim_batch(100, 'dl') d;
SELECT count(eventbox.nack(d.id, 'bang', NULL, 'dl2', d.lease))
FROM eventbox.claim_batch(2, 'dl2') d;
});

($rc, $out, $err) = run_cli('-d', $conn, 'dead-letters', 'list');
is($rc, 0, 'dead-letters list: exit 0');
like($out, qr/^\(32 dead letters\)$/m, 'lists all 32');
like($out, qr/^dl\s+\d+\s+job\.run\s+-\s+1\s+\S+ \S+\s+boom \d+$/m, 'one line per dead letter');

($rc, $out, $err) = run_cli('-d', $conn, 'dead-letters', 'list', '-s', 'dl', '-t', 'other.*', '--json');
is($rc, 0, 'list --json -s -t: exit 0');
my @dl = map { $json->decode($_) } grep { length } split /\n/, $out;
is(scalar @dl, 5, 'filters by subscription and type');
ok(!(grep { $_->{event_type} ne 'other.thing' || $_->{subscription} ne 'dl' } @dl),
	'... only matching ones');
ok(!(grep { exists $_->{payload} } @dl), 'list shows no payloads');

($rc, $out, $err) = run_cli('-d', $conn, 'dead-letters', 'list', '--older-than', '1 hour');
like($out, qr/^\(0 dead letters\)$/m, '--older-than filters by age');
($rc, $out, $err) = run_cli('-d', $conn, 'dead-letters', 'list', '--limit', '3');
like($out, qr/^\(3 dead letters; more may exist, raise --limit\)$/m, '--limit, and says more may exist');

my $one = $dl[0]{id};
($rc, $out, $err) = run_cli('-d', $conn, 'dead-letters', 'show', $one, '-s', 'dl');
is($rc, 0, 'dead-letters show: exit 0');
like($out, qr/^payload\s+\{"n": \d+\}$/m, 'show prints the payload');
like($out, qr/^last_error\s+boom $one$/m, 'show prints the last error');
($rc, $out, $err) = run_cli('-d', $conn, 'dead-letters', 'show', '999999');
is($rc, 1, 'show of an id that is not a dead letter: exit 1');
like($err, qr/event 999999 is not a dead letter.*dead-letters list/s, '... saying what to do');

($rc, $out, $err) = run_cli('-d', $conn, 'dead-letters', 'replay', '-s', 'dl', '-t', 'other.*', '--chunk', '2');
is($rc, 0, 'replay -t --chunk 2: exit 0');
is_deeply([ $err =~ /replayed (\d+) of 5 dead letters/g ], [ 2, 4, 5 ],
	'progress on stderr after each chunk');
like($out, qr/replayed 5 dead letters of subscription dl/, 'reports the total');
is($node->safe_psql('postgres', q{SELECT count(*) FROM eventbox.dead_letters WHERE subscription = 'dl'}),
	'25', 'the 5 other.thing dead letters were replayed, the job.run ones not');
is($node->safe_psql('postgres', q{SELECT count(*) FROM eventbox.claim_batch(100, 'dl')}),
	'5', 'replayed events can be claimed again');

($rc, $out, $err) = run_cli('-d', $conn, 'dead-letters', 'replay', '-s', 'nosuch');
is($rc, 1, 'replay of an unknown subscription: exit 1');
like($err, qr/nosuch/, '... naming it');

($rc, $out, $err) = run_cli('-d', $conn, 'dead-letters', 'purge', '-s', 'dl', '--older-than', '1 hour');
is($rc, 0, 'purge --older-than: exit 0');
like($out, qr/purged 0 dead letters/, 'nothing that old');
($rc, $out, $err) = run_cli('-d', $conn, 'dead-letters', 'purge', '-s', 'dl2', '--all');
like($out, qr/purged 2 dead letters of subscription dl2/, 'purge --all');
is($node->safe_psql('postgres', q{SELECT count(*) FROM eventbox.dead_letters WHERE subscription = 'dl'}),
	'25', 'purge of dl2 left dl alone');

# Interrupted replay: 3000 dead letters replayed one per transaction; SIGINT
# after the first chunks.  Every chunk is all or nothing, so replayed +
# still dead = 3000 and the tool's count matches the database's.
$node->safe_psql(
	'postgres', q{
SELECT eventbox.subscribe('big', '{bulk.*}', max_attempts => 1, start_at => 'now');
SELECT eventbox.publish_batch(jsonb_agg(jsonb_build_object('event_type', 'bulk.item',
                              'payload', jsonb_build_object('n', g))))
FROM generate_series(1, 3000) g;
});
$node->safe_psql('postgres', q{
SELECT count(eventbox.nack(d.id, 'bulk failure', NULL, 'big', d.lease))
FROM eventbox.claim_batch(3000, 'big') d;
});
{
	my ($rout, $rerr) = ('', '');
	my $h = IPC::Run::start([ $cli, '-d', $conn, 'dead-letters', 'replay', '-s', 'big', '--chunk', '1' ],
		'<', \undef, '>', \$rout, '2>', \$rerr, IPC::Run::timeout(120));
	my $deadline = time + 60;
	while ($rerr !~ /replayed 20 of 3000/ && time < $deadline)
	{
		$h->pump_nb;
		usleep(2_000);
	}
	$h->signal('INT');
	$h->finish;
	my $code = $? >> 8;
	my ($n) = $rerr =~ /interrupted: replayed (\d+) of 3000/;
  SKIP:
	{
		skip 'replay finished before the signal', 4 if $code == 0;
		is($code, 130, 'replay interrupted by SIGINT: exit 130');
		ok(defined $n, 'says how many were replayed') or diag $rerr;
		like($rerr, qr/rerun the same command to continue/, '... and how to continue');
		my ($dead, $retry) = split /\|/, $node->safe_psql(
			'postgres', q{
SELECT (SELECT dead FROM eventbox.stats WHERE subscription = 'big'),
       (SELECT scheduled_retries FROM eventbox.stats WHERE subscription = 'big')});
		is_deeply([ $dead + $retry, $retry ], [ 3000, $n // -1 ],
			'nothing half-done: replayed + dead = 3000 and matches the reported count');
	}
	($rc, $out, $err) = run_cli('-d', $conn, 'dead-letters', 'replay', '-s', 'big', '--chunk', '500', '-q');
	is($rc, 0, 'rerunning the replay finishes it');
	is($node->safe_psql('postgres', q{SELECT dead FROM eventbox.stats WHERE subscription = 'big'}),
		'0', 'no dead letters left');
}

# purge in chunks: 3000 dead letters again (claimed and nacked as before)
$node->safe_psql('postgres', q{
SELECT count(eventbox.nack(d.id, 'again', NULL, 'big', d.lease))
FROM eventbox.claim_batch(3000, 'big') d;
});
($rc, $out, $err) = run_cli('-d', $conn, 'dead-letters', 'purge', '-s', 'big', '--all', '--chunk', '1000');
is($rc, 0, 'purge --all --chunk: exit 0');
like($out, qr/purged 3000 dead letters of subscription big/, 'purges all 3000');
like($err, qr/purged 3000 of 3000 dead letters/, 'with progress on stderr');
is($node->safe_psql('postgres', q{SELECT dead FROM eventbox.stats WHERE subscription = 'big'}),
	'0', 'none left');

$node->stop;
done_testing();
