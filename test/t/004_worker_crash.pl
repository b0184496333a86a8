
# Copyright (c) eventbox contributors

# 004_worker_crash.pl: G1 and G2 across kill -9 of the worker and of the
# postmaster (fsync on, restart_after_crash on).
#
# Eight publisher connections (test/t/crash_listener.py publish) publish
# 20,000 markers, one event per transaction; the transaction also inserts
# (marker, try) into `committed`, and about 10% of the markers roll back on
# purpose.  Publishers reconnect after a crash; a transaction whose outcome
# is unknown is looked up in `committed` and, if it never committed,
# retried with try + 1 (the event of the lost try must then never be
# delivered).  While they run the test kills the eventbox worker with
# SIGKILL (the postmaster then restarts everything), later the postmaster
# itself (the test starts it again), later the worker once more.
#
# Three subscriptions watch the stream:
#  - crashpull (pull): a consumer claims batches during the stream, records
#    them in `pulled` and acks them in the claiming transaction, then drains
#    the rest at the end.  `pulled` must equal `committed` exactly: no loss,
#    no duplicate, no event of a rolled-back transaction or try.
#  - crashpush (push, lease 2 s): a LISTEN client acks every notification
#    with eventbox.ack(id, 'crashpush', lease), reconnecting after crashes.
#    Once the subscription shows nothing pending or leased, every committed
#    event was received at least once (duplicates are allowed and counted)
#    and nothing else was received.
#  - default (push_once): its cursor catches up; whatever the listener got
#    on channel eventbox was committed and came once.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use IPC::Run;
use File::Basename qw(dirname);
use Cwd qw(abs_path);
use Time::HiRes qw(time usleep);

my $events = $ENV{EVENTBOX_CRASH_EVENTS} // 20_000;
my $seed = $ENV{EVENTBOX_CRASH_SEED} // int(rand(2**31));
my $threads = 8;
my $rollback_pct = 10;

# the crashes, in order, at these numbers of finished markers
my @crashes = (
	[ int($events * 0.25), 'worker' ],
	[ int($events * 0.50), 'postmaster' ],
	[ int($events * 0.75), 'worker' ]);

note "publisher random seed $seed (set EVENTBOX_CRASH_SEED to repeat)";

my $python = -x '/usr/bin/python3' ? '/usr/bin/python3' : 'python3';
my $helper = abs_path(dirname(__FILE__)) . '/crash_listener.py';
# psycopg2 is installed by scripts/setup.sh (python3-psycopg2); a missing
# module is a broken setup, not a reason to skip the test.
if (system($python, '-c', 'import psycopg2') != 0)
{
	BAIL_OUT("$python cannot import psycopg2: run scripts/setup.sh (it installs python3-psycopg2)");
}

my $started = time;

my $node = PostgreSQL::Test::Cluster->new('crash');
$node->init;
$node->append_conf(
	'postgresql.conf', qq{
shared_preload_libraries = 'eventbox'
fsync = on
synchronous_commit = on
restart_after_crash = on
max_connections = 40
# 20,000 publishing transactions: keep the server log readable
log_statement = none
});
$node->start;

$node->safe_psql(
	'postgres', q{
CREATE EXTENSION eventbox;
SELECT eventbox.subscribe('crashpush', mode => 'push', lease => '2 seconds',
						  backoff_base => '100 ms', backoff_max => '500 ms',
						  max_attempts => 1000);
SELECT eventbox.subscribe('crashpull');
-- the committed publishing transactions: marker and which try committed
CREATE TABLE committed (marker int PRIMARY KEY, try int NOT NULL);
-- what the pull consumer got, recorded in the claiming transaction
CREATE TABLE pulled (id bigint NOT NULL, marker int, try int, attempt int);
});

my $dir = PostgreSQL::Test::Utils::tempdir;
my $dsn = $node->connstr('postgres');

# Start the helper in the background.
my @helpers;
sub start_helper
{
	my ($name, @args) = @_;
	my $err = "$dir/$name.err";
	my $h = IPC::Run::start([ $python, $helper, @args, '--dsn', $dsn ],
		'<', '/dev/null', '>', "$dir/$name.stdout", '2>', $err);
	push @helpers, $h;
	return { h => $h, name => $name, err => $err };
}

# If the test dies half-way, do not leave helpers retrying to connect.
END
{
	local $?;
	for my $h (@helpers)
	{
		$h->kill_kill(grace => 2) if $h->pumpable;
	}
}

# Wait for a helper and check its exit status.
sub finish_helper
{
	my ($p) = @_;
	my $ok = $p->{h}->finish;
	my $rc = $p->{h}->full_result >> 8;
	my $err = -s $p->{err} ? slurp_file($p->{err}) : '';
	note "$p->{name} stderr:\n$err" if $err ne '';
	is($rc, 0, "$p->{name} finished without error");
	return $ok;
}

# The "summary" line of a helper's output, as text.
sub summary
{
	my ($file) = @_;
	my @s = grep { /^summary / } split /\n/, slurp_file($file);
	return @s ? substr($s[-1], 8) : '(no summary)';
}

# Run a query, retrying while the server restarts.  Returns undef if it
# never succeeded within $secs.
sub query_retry
{
	my ($sql, $secs) = @_;
	my $until = time + ($secs // 90);
	while (time < $until)
	{
		my ($rc, $out, $err) = $node->psql('postgres', $sql);
		return $out if $rc == 0;
		usleep(100_000);
	}
	return undef;
}

# The pid and state of the database's eventbox worker, waiting for it to
# come up.
sub worker_pid
{
	my $until = time + 90;
	while (time < $until)
	{
		my $row = query_retry(
			q{SELECT pid, state FROM pg_stat_activity
			  WHERE backend_type = 'eventbox worker' AND datname = 'postgres'});
		return split(/\|/, $row) if defined $row && $row =~ /^\d+\|/;
		usleep(100_000);
	}
	return;
}

# The pids of a process's children, from /proc.
sub children_of
{
	my ($ppid) = @_;
	my @kids;
	opendir(my $d, '/proc') or die "cannot read /proc: $!";
	for my $pid (grep { /^\d+$/ } readdir($d))
	{
		open(my $f, '<', "/proc/$pid/stat") or next;
		my $stat = <$f>;
		close($f);
		next unless defined $stat;
		# pid (comm) state ppid ...; comm may contain spaces
		push @kids, $pid if $stat =~ /\)\s+\S+\s+(\d+)/ && $1 == $ppid;
	}
	closedir($d);
	return @kids;
}

# Progress of the publishers: markers finished.
my $progress = "$dir/progress";
sub progress
{
	return 0 unless -e $progress;
	my $n = slurp_file($progress);
	chomp $n;
	return $n =~ /^\d+$/ ? $n : 0;
}

my $listener_out = "$dir/listen.out";
my $listener = start_helper(
	'listener', 'listen',
	'--out' => $listener_out,
	'--ready' => "$dir/listen.ready",
	'--stop' => "$dir/listen.stop");
my $ready_until = time + 60;
usleep(50_000) while !-e "$dir/listen.ready" && time < $ready_until;
ok(-e "$dir/listen.ready", 'the push listener is listening');

my $puller = start_helper(
	'pull consumer', 'pull',
	'--out' => "$dir/pull.out",
	'--stop' => "$dir/pull.stop");

my $pub_started = time;
my $publisher = start_helper(
	'publisher', 'publish',
	'--events' => $events,
	'--threads' => $threads,
	'--rollback-pct' => $rollback_pct,
	'--seed' => $seed,
	'--progress' => $progress,
	'--out' => "$dir/publish.out");

# The crashes.
my $crash_count = 0;
for my $c (@crashes)
{
	my ($at, $what) = @$c;
	my $until = time + 180;
	usleep(20_000) while progress() < $at && $publisher->{h}->pumpable && time < $until;
	my $done = progress();
	if ($done < $at)
	{
		fail("publishers reached $at markers before the $what crash");
		last;
	}
	if ($what eq 'worker')
	{
		my ($pid, $state) = worker_pid();
		ok(defined $pid, "found the eventbox worker before crash " . ($crash_count + 1));
		last unless defined $pid;
		kill 'KILL', $pid;
		note sprintf("%.1f s: kill -9 of the eventbox worker (pid %d, %s) at %d markers",
			time - $pub_started, $pid, $state, progress());
	}
	else
	{
		my $pm = $node->{_pid};
		my @kids = children_of($pm);
		note sprintf("%.1f s: kill -9 of the postmaster (pid %d, %d children) at %d markers",
			time - $pub_started, $pm, scalar(@kids), progress());
		$node->kill9;
		# the server cannot start while a child still holds the old shared
		# memory; children exit when they notice the postmaster is gone
		my $gone_until = time + 60;
		while (time < $gone_until && grep { kill(0, $_) } @kids)
		{
			usleep(50_000);
		}
		my $started_again = 0;
		for my $try (1 .. 10)
		{
			last if $started_again = $node->start(fail_ok => 1);
			sleep 1;
		}
		ok($started_again, 'the server started again after kill -9 of the postmaster');
		last unless $started_again;
	}
	$crash_count++;
	# back in service: a new worker runs
	my ($new) = worker_pid();
	ok(defined $new, "a worker runs again after crash $crash_count");
	note sprintf("%.1f s: worker %s serving again at %d markers",
		time - $pub_started, $new // '(none)', progress());
}

finish_helper($publisher);
my $pub_secs = time - $pub_started;
note "publisher: " . summary("$dir/publish.out");

# The pull consumer stops; a drain claims the rest.
PostgreSQL::Test::Utils::append_to_file("$dir/pull.stop", "stop\n");
finish_helper($puller);
my $drainer = start_helper('pull drain', 'pull', '--out' => "$dir/pull.out", '--drain');
finish_helper($drainer);
note "pull consumer: " . join("\n  ", grep { s/^summary // } split /\n/, slurp_file("$dir/pull.out"));

# The push listener runs until crashpush has nothing pending or leased
# (events not acked are re-sent after their lease ran out).
my $settle_until = time + 120;
my $push_state;
while (time < $settle_until)
{
	$push_state = query_retry(
		q{SELECT pending, leased, scheduled_retries FROM eventbox.stats
		  WHERE subscription = 'crashpush'});
	last if defined $push_state && $push_state eq '0|0|0';
	usleep(200_000);
}
is($push_state, '0|0|0', 'crashpush: nothing pending, leased or waiting for a retry');
my $settle_secs = time - $pub_started - $pub_secs;
# default: its cursor caught up
my $default_pending;
my $default_until = time + 60;
while (time < $default_until)
{
	$default_pending = query_retry(
		q{SELECT pending FROM eventbox.stats WHERE subscription = 'default'});
	last if defined $default_pending && $default_pending eq '0';
	usleep(200_000);
}
is($default_pending, '0', 'default: the push_once cursor caught up');

PostgreSQL::Test::Utils::append_to_file("$dir/listen.stop", "stop\n");
finish_helper($listener);
note "listener: " . summary($listener_out);

is($crash_count, scalar(@crashes), 'every crash happened during the stream');

# --- What committed ---------------------------------------------------------

my %committed;		# marker -> try
for (split /\n/, $node->safe_psql('postgres', 'SELECT marker, try FROM committed'))
{
	my ($m, $t) = split /\|/;
	$committed{$m} = $t;
}
my %rolled_back;	# markers rolled back on purpose
for (split /\n/, slurp_file("$dir/publish.out"))
{
	$rolled_back{$1} = 1 if /^rolledback (\d+)$/;
}
my $n_committed = scalar(keys %committed);
my $lost_tries = 0;
$lost_tries += $committed{$_} - 1 for keys %committed;
note sprintf(
	"%d markers: %d committed (%d of them after %d tries lost to a crash), "
	  . "%d rolled back on purpose",
	$events, $n_committed, scalar(grep { $committed{$_} > 1 } keys %committed),
	$lost_tries, scalar(keys %rolled_back));
is($n_committed + scalar(keys %rolled_back), $events,
	'every marker either committed or rolled back on purpose');
is(scalar(grep { $committed{$_} } keys %rolled_back), 0,
	'no marker rolled back on purpose is in committed');

my $logged = $node->safe_psql('postgres',
	q{SELECT count(*), count(DISTINCT payload->>'m') FROM eventbox.log});
is($logged, "$n_committed|$n_committed",
	'the log holds one event per committed marker (count, distinct markers)');

# --- crashpull: exactly the committed events, once --------------------------

sub rows { return $node->safe_psql('postgres', $_[0]); }

my ($pulled, $pulled_ids) = split /\|/,
  rows('SELECT count(*), count(DISTINCT id) FROM pulled');
note "crashpull: $pulled events pulled, $pulled_ids distinct";
is($pulled, $n_committed, 'crashpull: as many pulled as committed');
is($pulled_ids, $pulled, 'crashpull: no event pulled twice')
  or diag "duplicates (id, times):\n"
  . rows('SELECT id, count(*) FROM pulled GROUP BY id HAVING count(*) > 1 ORDER BY id LIMIT 20');
is(rows('SELECT count(*) FROM (SELECT marker, try FROM committed
		 EXCEPT SELECT marker, try FROM pulled) x'),
	0, 'crashpull: every committed event pulled')
  or diag "lost (marker, try):\n"
  . rows('SELECT marker, try FROM committed EXCEPT SELECT marker, try FROM pulled
		  ORDER BY 1 LIMIT 20');
is(rows('SELECT count(*) FROM (SELECT marker, try FROM pulled
		 EXCEPT SELECT marker, try FROM committed) x'),
	0, 'crashpull: nothing pulled that did not commit')
  or diag "rolled back but pulled (marker, try):\n"
  . rows('SELECT marker, try FROM pulled EXCEPT SELECT marker, try FROM committed
		  ORDER BY 1 LIMIT 20');
is(rows(q{SELECT pending || '|' || leased || '|' || scheduled_retries || '|' || dead
		  || '|' || published_total || '|' || delivered_total || '|' || acked_total
		  FROM eventbox.stats WHERE subscription = 'crashpull'}),
	"0|0|0|0|$n_committed|$n_committed|$n_committed",
	'crashpull: stats (pending|leased|retries|dead|published|delivered|acked)');

# --- crashpush and default: what the listener received ---------------------

my (%push_by_id, %push_markers, %default_by_id, @bad, @mismatch);
my ($push_lines, $default_lines, $other_lines) = (0, 0, 0);
my %max_attempt;
for (split /\n/, slurp_file($listener_out))
{
	if (/^(push|default) (\d+) (\S+) (\S+) (\S+) (\S+)$/)
	{
		my ($kind, $id, $m, $t, $attempt, $sub) = ($1, $2, $3, $4, $5, $6);
		my $by_id = $kind eq 'push' ? \%push_by_id : \%default_by_id;
		my $want_sub = $kind eq 'push' ? 'crashpush' : 'default';
		push @mismatch, "$kind: id $id came as subscription $sub" if $sub ne $want_sub;
		if (exists $by_id->{$id} && $by_id->{$id} ne "$m/$t")
		{
			push @mismatch, "$kind: id $id came as $by_id->{$id} and as $m/$t";
		}
		$by_id->{$id} = "$m/$t";
		if (!defined $committed{$m} || $committed{$m} ne $t)
		{
			push @bad, "$kind: id $id marker $m try $t attempt $attempt"
			  . (defined $committed{$m} ? " (try $committed{$m} committed)"
				: $rolled_back{$m} ? ' (rolled back on purpose)' : ' (never committed)');
		}
		if ($kind eq 'push')
		{
			$push_lines++;
			$push_markers{$m} = 1;
			$max_attempt{$attempt}++;
		}
		else
		{
			$default_lines++;
		}
	}
	elsif (!/^summary /)
	{
		$other_lines++;
		push @mismatch, "unexpected line: $_";
	}
}
my @push_lost = sort { $a <=> $b } grep { !$push_markers{$_} } keys %committed;
my $push_dups = $push_lines - scalar(keys %push_by_id);
note sprintf(
	"crashpush: %d notifications, %d distinct events, %d duplicates "
	  . "(re-sent after lease expiry or a lost ack); by attempt: %s",
	$push_lines, scalar(keys %push_by_id), $push_dups,
	join(', ', map { "$_: $max_attempt{$_}" } sort { $a <=> $b } keys %max_attempt));
note sprintf(
	"default: %d notifications received of %d committed events "
	  . "(push_once: what was sent while the listener was away is gone), %d duplicates",
	$default_lines, $n_committed, $default_lines - scalar(keys %default_by_id));

is(scalar(@push_lost), 0, 'crashpush: every committed event received at least once')
  or diag "lost markers (first 20 of " . scalar(@push_lost) . "): "
  . join(' ', @push_lost[ 0 .. ($#push_lost < 19 ? $#push_lost : 19) ]);
is(scalar(@bad), 0, 'no notification of an event that did not commit')
  or diag "not committed (first 20 of " . scalar(@bad) . "):\n"
  . join("\n", @bad[ 0 .. ($#bad < 19 ? $#bad : 19) ]);
is(scalar(@mismatch), 0, 'every notification is well-formed and consistent')
  or diag join("\n", @mismatch[ 0 .. ($#mismatch < 19 ? $#mismatch : 19) ]);
is($default_lines - scalar(keys %default_by_id),
	0, 'default: no event notified twice (push_once)');

my ($p_dead, $p_pub, $p_delivered, $p_acked, $p_retried) = split /\|/,
  rows(q{SELECT dead, published_total, delivered_total, acked_total, retried_total
		 FROM eventbox.stats WHERE subscription = 'crashpush'});
note "crashpush stats: published $p_pub, delivered $p_delivered, acked $p_acked, "
  . "retried $p_retried, dead $p_dead";
is($p_dead, 0, 'crashpush: no dead letters');
is($p_pub, $n_committed, 'crashpush: published_total counts the committed events');
is($p_acked, $n_committed, 'crashpush: acked_total counts every committed event once');

# --- the crashes as the server log tells them --------------------------------

my $log = slurp_file($node->logfile);
my $sigkills = () = $log =~ /was terminated by signal 9/g;
my $reinit = () = $log =~ /all server processes terminated; reinitializing/g;
my $recoveries = () = $log =~ /database system was not properly shut down; automatic recovery in progress/g;
note "server log: $sigkills process(es) terminated by signal 9, $reinit crash restarts "
  . "by the postmaster, $recoveries crash recoveries";
is($sigkills, scalar(grep { $_->[1] eq 'worker' } @crashes),
	'the server log shows each worker kill');
# push_once: after each crash the worker moves the default subscription's
# cursor past the events committed before it (its moves were asynchronous)
my $resets = () = $log =~ /push_once delivery in database "postgres" resumes after the events committed before the crash/g;
note "push_once cursor moves past a crash: $resets";
ok($resets >= $recoveries && $recoveries > 0,
	'after every crash recovery the push_once cursors move past the crash');
my @cycle_failures = $log =~ /(eventbox worker cycle failed: [^\n]*)/g;
note "worker cycle failures logged: " . scalar(@cycle_failures)
  . (@cycle_failures ? "\n  " . join("\n  ", @cycle_failures[0 .. ($#cycle_failures < 9 ? $#cycle_failures : 9)]) : '');

$node->stop;
note sprintf(
	"publishing with %d crashes took %.1f s, crashpush settled %.1f s later; test took %.1f s",
	$crash_count, $pub_secs, $settle_secs, time - $started);

done_testing();
