# Copyright (c) eventbox contributors

# 006_push_once_crash.pl: where push_once delivery resumes after a restart.
#
# The worker commits its cursor moves without waiting for their WAL flush,
# so after a crash the default (push_once) subscription resumes after every
# event committed before the crash, so that no event is sent twice (see
# worker_reset_push_once in src/worker.c).  These checks pin down the
# boundary, with the worker disabled so that nothing is forwarded before
# the restart:
#
# - after a clean restart the backlog is delivered, and no cursor is moved;
# - after a crash, events committed before it are not delivered; events
#   committed after the restart are, also those committed before the worker
#   ran again, and so is a transaction prepared before the crash and
#   committed after it; the server log says what happened, once.

use strict;
use warnings;

use FindBin;
use lib $FindBin::RealBin;

use EventboxListener;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('once');
$node->init;
$node->append_conf(
	'postgresql.conf', qq{
shared_preload_libraries = 'eventbox'
eventbox.naptime = '200ms'
restart_after_crash = on
max_prepared_transactions = 5
statement_timeout = '60s'
});
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION eventbox');

my $reset_re =
  qr/push_once delivery in database "postgres" resumes after the events committed before the crash/;

sub set_enabled
{
	my ($on) = @_;
	$node->safe_psql('postgres',
		'ALTER SYSTEM SET eventbox.enabled = ' . ($on ? 'on' : 'off'));
	$node->reload;
	ok( $node->poll_query_until(
			'postgres', q{
SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'eventbox worker'},
			$on ? '1' : '0'),
		'eventbox.enabled = ' . ($on ? 'on' : 'off') . ': the worker '
		  . ($on ? 'runs' : 'is gone'));
	return;
}

sub publish
{
	my ($type, $n) = @_;
	$node->safe_psql('postgres',
		qq{SELECT eventbox.publish('$type', jsonb_build_object('i', i)) FROM generate_series(1, $n) i});
	return;
}

sub count_type
{
	my ($l, $type) = @_;
	return scalar($l->matching(sub { ($_->{event_type} // '') eq $type }));
}

# --- a clean restart keeps the backlog ---------------------------------------

set_enabled(0);
publish('clean.ev', 3);
$node->restart;
my $l = EventboxListener->start($node, 'postgres', ['eventbox']);
set_enabled(1);
$l->wait_for(sub { (grep { ($_->{msg}{event_type} // '') eq 'clean.ev' } @_) >= 3 },
	'the backlog of a clean restart is delivered');
is(count_type($l, 'clean.ev'), 3, 'after a clean restart: each event of the backlog once');
unlike(slurp_file($node->logfile), $reset_re, 'after a clean restart no cursor is moved');
$l->stop;

# --- a crash ------------------------------------------------------------------

set_enabled(0);
publish('before.ev', 3);
$node->safe_psql(
	'postgres', q{
BEGIN;
SELECT eventbox.publish('prepared.ev', '{}');
PREPARE TRANSACTION 'spans_the_crash';
});
my $launcher = $node->safe_psql('postgres',
	q{SELECT pid FROM pg_stat_activity WHERE backend_type = 'eventbox launcher'});
like($launcher, qr/^\d+$/, 'the launcher runs');
my $log_offset = -s $node->logfile;
kill 'KILL', $launcher;
ok($node->wait_for_log(qr/all server processes terminated; reinitializing/, $log_offset),
	'kill -9 of the launcher: the postmaster restarts the server');
$node->poll_query_until('postgres', 'SELECT true') or die 'the server did not come back';

# committed after the restart, before any worker ran
publish('after.ev', 2);
$l = EventboxListener->start($node, 'postgres', ['eventbox']);
set_enabled(1);
$l->wait_for(sub { (grep { ($_->{msg}{event_type} // '') eq 'after.ev' } @_) >= 2 },
	'events committed after the restart are delivered');
$node->safe_psql('postgres', q{COMMIT PREPARED 'spans_the_crash'});
$l->wait_for(sub { grep { ($_->{msg}{event_type} // '') eq 'prepared.ev' } @_ },
	'a transaction prepared before the crash and committed after it is delivered');
# one more, so that everything before it has been forwarded
publish('last.ev', 1);
$l->wait_for(sub { grep { ($_->{msg}{event_type} // '') eq 'last.ev' } @_ },
	'the last event is delivered');
is(count_type($l, 'after.ev'), 2, 'after a crash: each event committed after the restart once');
is(count_type($l, 'prepared.ev'), 1, 'after a crash: the prepared transaction\'s event once');
is(count_type($l, 'before.ev'), 0,
	'after a crash: events committed before it, not yet forwarded, are not sent');
$l->stop;

my @resets = slurp_file($node->logfile) =~ /$reset_re/g;
is(scalar(@resets), 1, 'the server log reports the move once');
# (the worker writes its push_once position to the cursor row within a second)
ok( $node->poll_query_until(
		'postgres', q{SELECT pending = 0 FROM eventbox.stats WHERE subscription = 'default'}),
	'nothing is pending for the default subscription');
# the log still has what the cursor skipped
is( $node->safe_psql(
		'postgres', q{SELECT count(*) FROM eventbox.log WHERE event_type = 'before.ev'}),
	'3',
	'the events skipped are still in the log');

$node->stop;
done_testing();
