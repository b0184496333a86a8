# Copyright (c) eventbox contributors

# 002_worker_delivery.pl: what the background worker delivers, and when.
#
# - LISTEN eventbox (the default push_once subscription) gets an event once
#   its transaction commits, never before, with exactly the payload and
#   headers published (G6) and its envelope; rolled-back transactions and
#   savepoints send nothing (G1).
# - notify modes: 'envelope' (no payload, no headers), 'wakeup' (one message
#   per cycle, not per event), 'none' (nothing), and a payload too big for a
#   notification ("payload_omitted", full payload from eventbox.event(id)).
# - push (at-least-once): an event nobody acks is sent again with attempt 2
#   and 3, then dead-lettered with 'lease expired', driven by the worker's
#   timers alone (nobody calls claim_batch); an event acked within its lease
#   is never sent again.
# - a pull subscription is woken on its channel and then claims the event.
# - deliver_at: not notified before that time, notified after it with no
#   further publish (the worker's timer).
# - the launcher and worker show in pg_stat_activity.
# - without shared_preload_libraries the SQL API works and no worker runs.
#
# eventbox.naptime is set to 10 minutes so that everything delivered here
# is delivered because of a commit or a timer, never by the fallback poll.
# Timing is never asserted beyond generous timeouts.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use EventboxListener;
use JSON::PP;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep time);

my $json = JSON::PP->new->utf8->canonical;

my $node = PostgreSQL::Test::Cluster->new('delivery');
$node->init;
$node->append_conf(
	'postgresql.conf', qq{
shared_preload_libraries = 'eventbox'
eventbox.naptime = '10min'
fsync = off
statement_timeout = '2min'
});
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION eventbox');

# Wait until the worker of database postgres runs.
ok( $node->poll_query_until(
		'postgres', q{
SELECT count(*) = 1 FROM pg_stat_activity
WHERE backend_type = 'eventbox worker' AND datname = 'postgres'}),
	'worker of database postgres shows in pg_stat_activity as "eventbox worker"');
is( $node->safe_psql(
		'postgres', q{
SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'eventbox launcher'}),
	'1',
	'one launcher shows in pg_stat_activity as "eventbox launcher"');

# Wait a little and return whether nothing new matched meanwhile.
sub quiet_for
{
	my ($l, $secs, $pred) = @_;
	usleep($secs * 1_000_000);
	return scalar($l->matching($pred)) == 0;
}

# Publish in separate transactions, waiting until the listener $l has seen
# a sentinel event on the default subscription: the worker has then
# finished every cycle that could have carried the earlier events.
my $sentinels = 0;

# Wait until listener $l has a notification of event $id (test name
# $what) and return the first one, or undef when it never came.
sub wait_notified
{
	my ($l, $id, $what) = @_;
	$l->wait_for(sub { grep { ($_->{msg}{id} // 0) == $id } @_ }, $what);
	my ($m) = grep { ($_->{msg}{id} // 0) == $id } $l->messages;
	return $m;
}

sub sync_default
{
	my ($l) = @_;
	my $id = $node->safe_psql('postgres',
		"SELECT eventbox.publish('test.sentinel', '{\"n\": " . ++$sentinels . "}')");
	wait_notified($l, $id, "sentinel $id delivered");
	return;
}

my $all = EventboxListener->start($node, 'postgres', ['eventbox']);

# ---------------------------------------------------------------------------
# Delivery after commit, nothing before; payload and headers intact (G6)
# ---------------------------------------------------------------------------

my $payload = q[{"id": 42, "note": "h\u00e9llo \"quoted\"\nline two \u2713", "amount": 19.90,
  "big": 123456789012345678901234567890, "neg": -1.5e-7, "flag": false, "none": null,
  "nested": {"list": [1, "two", {"three": [3]}], "empty": {}, "arr": []}}];
my $headers = q[{"trace": "abc-123", "tenant": "t\u00fc", "n": [1, 2], "x": {"y": null}}];

my $tx = $node->background_psql('postgres');
$tx->query_safe('BEGIN');
my $id = $tx->query_safe(
	"SELECT eventbox.publish('order.created', \$j\$$payload\$j\$, 'order', '42', \$j\$$headers\$j\$)");
chomp $id;
ok(quiet_for($all, 1, sub { 1 }),
	'nothing is notified while the publishing transaction is open');
$tx->query_safe('COMMIT');
$tx->quit;

my $m = wait_notified($all, $id, 'event notified after commit');
SKIP:
{
	skip 'event not delivered', 12 unless $m;
	my $msg = $m->{msg};
	is($m->{channel}, 'eventbox', 'sent on channel eventbox');
	is($msg->{subscription}, 'default', 'by subscription default');
	is($msg->{event_type}, 'order.created', 'event_type');
	is($msg->{aggregate_type}, 'order', 'aggregate_type');
	is($msg->{aggregate_id}, '42', 'aggregate_id');
	is($msg->{attempt}, 1, 'attempt 1');
	ok(!exists $msg->{lease}, 'push_once: no lease');
	is_deeply($msg->{payload}, $json->decode($payload), 'payload as published');
	is_deeply($msg->{headers}, $json->decode($headers), 'headers as published');
	# the same, compared by PostgreSQL (numbers, unicode, escapes, key order)
	my $n = $m->{payload};
	$n =~ s/'/''/g;
	is( $node->safe_psql(
			'postgres', qq{
SELECT ('$n'::jsonb -> 'payload') = \$j\$$payload\$j\$::jsonb,
       ('$n'::jsonb -> 'headers') = \$j\$$headers\$j\$::jsonb}),
		't|t',
		'G6: notified payload and headers equal the published jsonb');
	is( $node->safe_psql(
			'postgres', qq{
SELECT e.event_id::text = ('$n'::jsonb ->> 'event_id')
   AND e.occurred_at = ('$n'::jsonb ->> 'occurred_at')::timestamptz
FROM eventbox.event($id) e}),
		't',
		'event_id and occurred_at match eventbox.event(id)');
	is(scalar(grep { ($_->{msg}{id} // 0) == $id } $all->messages),
		1, 'notified once');
}

# The worker writes notification texts itself; they must be exactly what
# jsonb_build_object(...)::text gives, also for characters JSON escapes.
my $odd_id = $node->safe_psql('postgres', q{
SELECT eventbox.publish('order.odd', '{"k": "a\"b\\\\c\nd\te\u0001f é ✓"}',
	E'ty\\\\pe "x"', E'id \"q\" \\\\ \n\t\x01\x1f é ✓ /', '{"h": "\u007f"}')});
my $odd = wait_notified($all, $odd_id, 'event with escaped characters notified');
SKIP:
{
	skip 'event not delivered', 1 unless $odd;
	my $n = $odd->{payload};
	$n =~ s/'/''/g;
	is( $node->safe_psql(
			'postgres', qq{
SELECT jsonb_build_object('id', e.id, 'attempt', 1, 'headers', e.headers,
	'payload', e.payload, 'event_id', e.event_id, 'event_type', e.event_type,
	'occurred_at', e.occurred_at, 'aggregate_id', e.aggregate_id,
	'subscription', 'default', 'aggregate_type', e.aggregate_type)::text = '$n'
FROM eventbox.event($odd_id) e}),
		't',
		'notification text is jsonb_build_object(...)::text of the event, escapes included');
}

# ---------------------------------------------------------------------------
# Rolled-back transactions and savepoints send nothing (G1)
# ---------------------------------------------------------------------------

$node->safe_psql(
	'postgres', q{
BEGIN;
SELECT eventbox.publish('rb.whole', '{"k": 1}');
ROLLBACK;
BEGIN;
SELECT eventbox.publish('rb.kept', '{"k": 2}');
SAVEPOINT s;
SELECT eventbox.publish('rb.ghost', '{"k": 3}');
ROLLBACK TO SAVEPOINT s;
SELECT eventbox.publish('rb.kept', '{"k": 4}');
COMMIT;
});
sync_default($all);
is_deeply(
	[ map { $_->{msg}{payload}{k} } $all->matching(sub { ($_->{event_type} // '') =~ /^rb\./ }) ],
	[ 2, 4 ],
	'only the committed events of a transaction with a rolled-back savepoint are sent; a rolled-back transaction sends nothing');

# ---------------------------------------------------------------------------
# notify modes
# ---------------------------------------------------------------------------

$node->safe_psql(
	'postgres', q{
SELECT eventbox.subscribe('env_sub', '{mode.env}', 'push_once', notify => 'envelope');
SELECT eventbox.subscribe('wake_sub', '{mode.wake}', 'push_once', notify => 'wakeup');
SELECT eventbox.subscribe('none_sub', '{mode.none}', 'push_once', notify => 'none');
});
my $modes = EventboxListener->start($node, 'postgres', [ 'env_sub', 'wake_sub', 'none_sub' ]);

my $env_id = $node->safe_psql('postgres',
	q{SELECT eventbox.publish('mode.env', '{"secret": 1}', 'acct', '7', '{"h": 1}')});
$node->safe_psql('postgres',
	q{SELECT eventbox.publish('mode.wake', jsonb_build_object('i', i)) FROM generate_series(1, 50) i});
my $none_id = $node->safe_psql('postgres',
	q{SELECT eventbox.publish('mode.none', '{"i": 0}')});
my $big_id = $node->safe_psql('postgres',
	q{SELECT eventbox.publish('mode.big', jsonb_build_object('blob', repeat('x', 9000)), 'acct', '8', '{"h": "big"}')});
sync_default($all);

my @env = grep { $_->{channel} eq 'env_sub' } $modes->messages;
is(scalar(@env), 1, "envelope: one message on env_sub");
if (@env)
{
	my $e = $env[0]{msg};
	is_deeply(
		[ $e->{id}, $e->{event_type}, $e->{aggregate_type}, $e->{aggregate_id}, $e->{attempt}, $e->{subscription} ],
		[ $env_id, 'mode.env', 'acct', '7', 1, 'env_sub' ],
		'envelope: id, event_type, aggregate, attempt, subscription');
	ok(!exists $e->{payload} && !exists $e->{headers},
		'envelope: no payload and no headers keys')
	  or diag $env[0]{payload};
}

my @wake = grep { $_->{channel} eq 'wake_sub' } $modes->messages;
is(scalar(@wake), 1, 'wakeup: 50 events of one transaction make one wake-up message, not 50');
is_deeply($wake[0]{msg}, { subscription => 'wake_sub', wakeup => JSON::PP::true },
	'wakeup: the message is {"subscription": "wake_sub", "wakeup": true}')
  if @wake;

is(scalar(grep { $_->{channel} eq 'none_sub' } $modes->messages),
	0, "none: no message");
# (a push_once position reaches the cursor row within about a second)
ok( $node->poll_query_until(
		'postgres', q{SELECT pending = 0 FROM eventbox.stats WHERE subscription = 'none_sub'}),
	'none: the event was consumed all the same (nothing pending)');

my ($big) = grep { ($_->{msg}{id} // 0) == $big_id } $all->messages;
ok($big, 'big payload: event notified');
if ($big)
{
	ok(length($big->{payload}) < 8000, 'big payload: notification under 8000 bytes');
	ok($big->{msg}{payload_omitted}, 'big payload: "payload_omitted": true');
	ok(!exists $big->{msg}{payload}, 'big payload: no payload key');
	is_deeply($big->{msg}{headers}, { h => 'big' }, 'big payload: headers still sent');
}
is( $node->safe_psql(
		'postgres',
		"SELECT (eventbox.event($big_id)).payload = jsonb_build_object('blob', repeat('x', 9000))"),
	't',
	'big payload: eventbox.event(id) returns the full payload');
$modes->stop;

# ---------------------------------------------------------------------------
# push: at-least-once with leases, retries and dead letters, on timers
# ---------------------------------------------------------------------------

$node->safe_psql(
	'postgres', q{
SELECT eventbox.subscribe('push_retry', '{push.retry}', 'push', lease => '1 second',
	max_attempts => 3, backoff_base => '100 ms', backoff_max => '200 ms');
SELECT eventbox.subscribe('push_ack', '{push.ack}', 'push', lease => '3 seconds',
	max_attempts => 3, backoff_base => '100 ms', backoff_max => '200 ms');
});
my $noack = EventboxListener->start($node, 'postgres', ['push_retry']);
my $acker = EventboxListener->start($node, 'postgres', ['push_ack'], ack => 1);

my $retry_id = $node->safe_psql('postgres',
	q{SELECT eventbox.publish('push.retry', '{"r": 1}', 'acct', '9', '{"h": 2}')});
my $ack_id = $node->safe_psql('postgres',
	q{SELECT eventbox.publish('push.ack', '{"a": 1}')});

ok( $node->poll_query_until(
		'postgres', qq{
SELECT count(*) = 1 FROM eventbox.dead_letters
WHERE subscription = 'push_retry' AND id = $retry_id
  AND attempts = 3 AND last_error = 'lease expired'}),
	'push: unacked event is dead-lettered after 3 attempts with last_error "lease expired"')
  or diag $node->safe_psql('postgres', 'SELECT * FROM eventbox.dead_letters');

my @sent = grep { $_->{msg}{id} == $retry_id } $noack->messages;
is_deeply([ map { $_->{msg}{attempt} } @sent ],
	[ 1, 2, 3 ], 'push: sent with attempt 1, then re-sent with attempt 2 and 3');
my %leases = map { ($_->{msg}{lease} // '') => 1 } @sent;
ok(@sent == 3 && !exists $leases{''} && keys(%leases) == 3,
	'push: each sending carries a new lease');
is_deeply($sent[-1]{msg}{payload}, { r => 1 }, 'push: re-sent with its payload')
  if @sent;

my @acked = $acker->wait_for(sub { grep { $_->{msg}{id} == $ack_id } @_ },
	'push: acked event sent');
my ($first) = grep { $_->{msg}{id} == $ack_id } @acked;
SKIP:
{
	skip 'acked event not sent', 4 unless $first;
	ok($first->{acked}, 'push: ack(id, subscription, lease) within the lease returns true');
	# wait until well past the lease the event was sent with
	my $until = $first->{msg}{leased_until};
	ok( $node->poll_query_until(
			'postgres', "SELECT clock_timestamp() > '$until'::timestamptz + interval '1 second'"),
		'push: waited past the lease of the acked event');
	# the worker has run a cycle since (sentinel), so an expiry would be done
	sync_default($all);
	is(scalar(grep { $_->{msg}{id} == $ack_id } $acker->messages),
		1, 'push: an event acked within its lease is never re-sent');
	is( $node->safe_psql(
			'postgres', q{
SELECT (SELECT count(*) FROM eventbox.dead_letters WHERE subscription = 'push_ack')
     + (SELECT count(*) FROM eventbox.outbox('leased', 10, 'push_ack'))
     + (SELECT count(*) FROM eventbox.outbox('retrying', 10, 'push_ack'))}),
		'0',
		'push: the acked event is neither leased, retrying nor dead');
}
# no fourth sending after the dead letter
is(scalar(grep { $_->{msg}{id} == $retry_id } $noack->messages),
	3, 'push: nothing is sent after the dead letter');
$noack->stop;
$acker->stop;

# ---------------------------------------------------------------------------
# pull: wake-up on the subscription's channel, then claim
# ---------------------------------------------------------------------------

$node->safe_psql('postgres', q{SELECT eventbox.subscribe('puller', '{pull.*}')});
my $pull = EventboxListener->start($node, 'postgres', ['puller']);
my $pull_id = $node->safe_psql('postgres', q{SELECT eventbox.publish('pull.one', '{"p": 1}')});
my @w = $pull->wait_for(sub { scalar @_ }, 'pull: wake-up after publish');
is_deeply($w[0]{msg}, { subscription => 'puller', wakeup => JSON::PP::true },
	'pull: wake-up message {"subscription": "puller", "wakeup": true} on channel puller')
  if @w;
is( $node->safe_psql(
		'postgres', q{
CREATE TEMP TABLE c AS SELECT * FROM eventbox.claim_batch(10, 'puller');
SELECT string_agg(id || ':' || event_type || ':' || attempt || ':' || eventbox.ack(id, 'puller', lease), ',')
FROM c}),
	"$pull_id:pull.one:1:true",
	'pull: claim_batch after the wake-up returns the event');
$pull->stop;

# ---------------------------------------------------------------------------
# deliver_at: on the worker's timer, not before
# ---------------------------------------------------------------------------

# Nothing else is due now (the push events are acked or dead), and naptime
# is 10 minutes: only the deliver_at timer can deliver this event.
my ($delay_id, $due) = split /\|/, $node->safe_psql(
	'postgres', q{
SELECT id, extract(epoch FROM at)
FROM (SELECT clock_timestamp() + interval '3 seconds' AS at) t,
	 eventbox.publish('delay.one', '{"d": 1}', deliver_at => t.at) id});
# look until shortly before deliver_at
my $quiet = $due - 0.3 - time;
SKIP:
{
	skip 'the machine is too slow to look before deliver_at', 1 if $quiet < 0.2;
	ok(quiet_for($all, $quiet, sub { ($_->{id} // 0) == $delay_id }),
		'deliver_at: not notified before deliver_at');
}
my @d = $all->wait_for(sub { grep { ($_->{msg}{id} // 0) == $delay_id } @_ },
	'deliver_at: notified after deliver_at without further publishes');
my ($dm) = grep { ($_->{msg}{id} // 0) == $delay_id } @d;
ok($dm && $dm->{at} >= $due,
	'deliver_at: received no earlier than deliver_at')
  or diag("received at " . ($dm ? $dm->{at} : 'never') . ", deliver_at $due");

$all->stop;

# The worker and launcher are still the only eventbox processes.
is( $node->safe_psql(
		'postgres', q{
SELECT string_agg(backend_type || ':' || coalesce(datname, '-'), ',' ORDER BY backend_type)
FROM pg_stat_activity WHERE backend_type LIKE 'eventbox%'}),
	'eventbox launcher:-,eventbox worker:postgres',
	'one launcher and one worker run');

$node->stop;

# ---------------------------------------------------------------------------
# Without preloading: the SQL API works, no worker
# ---------------------------------------------------------------------------

my $plain = PostgreSQL::Test::Cluster->new('nopreload');
$plain->init;
$plain->append_conf('postgresql.conf', "fsync = off\n");
$plain->start;
my ($rc, $out, $err) = $plain->psql('postgres', 'CREATE EXTENSION eventbox');
is($rc, 0, 'no preload: CREATE EXTENSION works') or diag $err;
SKIP:
{
	skip 'no preload: the extension could not be created', 2 if $rc != 0;
	$plain->safe_psql('postgres', q{SELECT eventbox.subscribe('p')});
	my $np_id = $plain->safe_psql('postgres',
		q{SELECT eventbox.publish('np.one', '{"x": 1}', 'acct', '1', '{"h": 1}')});
	is( $plain->safe_psql(
			'postgres', q{
CREATE TEMP TABLE c AS SELECT * FROM eventbox.claim_batch(10, 'p');
SELECT string_agg(c.id || ':' || c.payload::text || ':' || c.headers::text || ':'
				  || eventbox.ack(c.id, 'p', c.lease), ',')
FROM c}),
		qq[$np_id:{"x": 1}:{"h": 1}:true],
		'no preload: claim_batch returns the published event and ack accepts it');
	is($plain->safe_psql('postgres', q{SELECT count(*) FROM eventbox.claim_batch(10, 'p')}),
		'0', 'no preload: an acked event is not claimed again');
}
is( $plain->safe_psql(
		'postgres', q{SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE 'eventbox%'}),
	'0',
	'no preload: no eventbox process runs');
$plain->stop;

done_testing();
