# Copyright (c) eventbox contributors

# 007_push_once_handover.pl: the worker holds push_once positions in memory.
#
# The worker writes a push_once subscription's position to its cursor row
# only about once a second (and when it exits), so the row may lag behind
# what was already notified.  When alter_subscription gives a push_once
# subscription another mode while events flow, the new mode must start
# exactly where push_once delivery stopped: every event is delivered once,
# either by notification before the change or by the new mode after it.
#
# - push_once -> pull: a consumer claims right after the change;
# - push_once -> push: the worker itself goes on, now with leases;
# - while idle, the row catches up within about a second, and a clean
#   stop writes it too.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use EventboxListener;
use IPC::Run;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep);

my $node = PostgreSQL::Test::Cluster->new('handover');
$node->init;
$node->append_conf(
	'postgresql.conf', qq{
shared_preload_libraries = 'eventbox'
eventbox.naptime = '200ms'
eventbox.rotation_period = '1h'
statement_timeout = '60s'
});
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION eventbox');

# Publish $n events of type $type, one transaction each, in the background.
sub start_publisher
{
	my ($type, $n) = @_;
	my $sql = qq{DO \$\$ BEGIN FOR i IN 1..$n LOOP
		PERFORM eventbox.publish('$type', jsonb_build_object('i', i));
		COMMIT;
		PERFORM pg_sleep(0.0005);
	END LOOP; END \$\$;};
	return IPC::Run::start(
		[ 'psql', '-XAtq', '-v', 'ON_ERROR_STOP=1', '-d', $node->connstr('postgres'), '-c', $sql ],
		'>', \my $out, '2>', \my $err);
}

# Claim and ack everything the subscription has now; returns the ids.
sub drain
{
	my ($sub) = @_;
	my @ids;
	while (1)
	{
		my $got = $node->safe_psql('postgres',
			"WITH c AS (SELECT id FROM eventbox.claim_batch(1000, '$sub')),"
			  . " a AS (SELECT eventbox.ack(array_agg(id), '$sub') FROM c)"
			  . " SELECT string_agg(id::text, ',') FROM c, a");
		last if $got eq '';
		push @ids, split /,/, $got;
	}
	return @ids;
}

# Compare the ids delivered with the ids of $type in the log.
sub check_once
{
	my ($what, $type, @delivered) = @_;
	my %seen;
	my $dups = 0;
	$seen{$_}++ and $dups++ for @delivered;
	my @all = split /,/,
	  $node->safe_psql('postgres',
		"SELECT string_agg(id::text, ',') FROM eventbox.log WHERE event_type = '$type'");
	my @missing = grep { !$seen{$_} } @all;
	is($dups, 0, "$what: no event delivered twice");
	is(scalar(@missing), 0, "$what: no event left out (of " . scalar(@all) . ')');
}

sub ids_of
{
	my ($l, $type, $leased) = @_;
	return map { $_->{msg}{id} }
	  grep {
		($_->{msg}{event_type} // '') eq $type
		  && (defined $_->{msg}{lease}) == $leased
	  } $l->messages;
}

# --- push_once -> pull -------------------------------------------------------------
$node->safe_psql('postgres',
	"SELECT eventbox.subscribe('hop', '{hop.*}', mode => 'push_once', channel => 'hop')");
my $l = EventboxListener->start($node, 'postgres', ['hop']);
my $pub = start_publisher('hop.ev', 3000);
$l->wait_for(sub { (grep { ($_->{msg}{event_type} // '') eq 'hop.ev' } @_) >= 300 },
	'push_once delivery runs');
$node->safe_psql('postgres', "SELECT eventbox.alter_subscription('hop', mode => 'pull')");
my @claimed = drain('hop');    # at once: the row must already be current
$pub->finish;
push @claimed, drain('hop');
$l->stop;
my @notified = ids_of($l, 'hop.ev', 0);
ok(@notified > 0 && @claimed > 0,
	'push_once -> pull: both modes delivered ('
	  . scalar(@notified) . ' notified, '
	  . scalar(@claimed)
	  . ' claimed)');
check_once('push_once -> pull', 'hop.ev', @notified, @claimed);

# --- push_once -> push -------------------------------------------------------------
$node->safe_psql('postgres',
	"SELECT eventbox.subscribe('hoq', '{hoq.*}', mode => 'push_once', channel => 'hoq')");
$l = EventboxListener->start($node, 'postgres', ['hoq'], ack => 1);
$pub = start_publisher('hoq.ev', 3000);
$l->wait_for(sub { (grep { ($_->{msg}{event_type} // '') eq 'hoq.ev' } @_) >= 300 },
	'push_once delivery runs');
$node->safe_psql('postgres', "SELECT eventbox.alter_subscription('hoq', mode => 'push')");
$pub->finish;
my $total = $node->safe_psql('postgres',
	"SELECT count(*) FROM eventbox.log WHERE event_type = 'hoq.ev'");
$l->wait_for(sub { (grep { ($_->{msg}{event_type} // '') eq 'hoq.ev' } @_) >= $total },
	'every event is delivered');
usleep(500_000);    # a duplicate would come right behind
$l->stop;
my @once = ids_of($l, 'hoq.ev', 0);
my @leased = ids_of($l, 'hoq.ev', 1);
ok(@once > 0 && @leased > 0,
	'push_once -> push: both modes delivered ('
	  . scalar(@once)
	  . ' without a lease, '
	  . scalar(@leased)
	  . ' leased)');
check_once('push_once -> push', 'hoq.ev', @once, @leased);

# --- the row catches up -----------------------------------------------------------
$node->safe_psql('postgres',
	"SELECT eventbox.subscribe('hor', '{hor.*}', mode => 'push_once', channel => 'hor')");
$node->safe_psql('postgres',
	"SELECT eventbox.publish('hor.ev') FROM generate_series(1, 50)");
ok( $node->poll_query_until(
		'postgres',
		"SELECT pending = 0 AND delivered_total = 50 FROM eventbox.stats WHERE subscription = 'hor'"),
	'while idle, the cursor row catches up with what was delivered');
$node->safe_psql('postgres', "SELECT eventbox.publish('hor.ev')");
ok( $node->poll_query_until(
		'postgres',
		"SELECT delivered_total = 51 FROM eventbox.stats WHERE subscription = 'hor'"),
	'and again after one more event');
# a clean stop writes what the worker holds (most often before its
# once-a-second write)
$l = EventboxListener->start($node, 'postgres', ['hor']);
$node->safe_psql('postgres', "SELECT eventbox.publish('hor.ev') FROM generate_series(1, 5)");
$l->wait_for(sub { (grep { ($_->{msg}{event_type} // '') eq 'hor.ev' } @_) >= 5 },
	'the last five are delivered');
$l->stop;
$node->restart;
is( $node->safe_psql(
		'postgres', "SELECT delivered_total FROM eventbox.stats WHERE subscription = 'hor'"),
	'56', 'after a clean restart the row has every delivery');

$node->stop;
done_testing();
