# Copyright (c) eventbox contributors

# EventboxListener: runs test/t/listener.py (a LISTEN client) in the
# background for the worker's TAP tests and reads what it received.
#
#   my $l = EventboxListener->start($node, 'postgres', ['eventbox']);
#   ... publish ...
#   my @m = $l->wait_for(sub { grep { ... } @_ }, 'what we wait for');
#   $l->stop;
#
# Each received notification is a hash: channel, payload (the text), msg
# (the payload parsed as JSON, undef if it is not JSON), pid (the notifying
# backend), at (epoch seconds when the listener read it), acked (with ack).

package EventboxListener;

use strict;
use warnings;

use Encode ();
use File::Basename qw(dirname);
use File::Spec;
use IPC::Run;
use JSON::PP;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep time);

my $script = File::Spec->rel2abs(dirname(__FILE__) . '/listener.py');
my $python = $ENV{EVENTBOX_PYTHON}
  // (-x '/usr/bin/python3' ? '/usr/bin/python3' : 'python3');
# lines of the file are UTF-8 bytes; the payload inside is a character string
my $json_bytes = JSON::PP->new->utf8->canonical;
my $json_chars = JSON::PP->new->canonical;

# Start a listener on $channels (array ref) of database $db.  Options:
# ack => 1 (ack push deliveries on receipt), stuck => 1 (stay inside an
# open transaction until ->release), timeout => seconds (default 150).
# Returns once the listener is listening.
sub start
{
	my ($class, $node, $db, $channels, %opts) = @_;
	my $dir = PostgreSQL::Test::Utils::tempdir;
	my $self = bless {
		dir => $dir,
		out => "$dir/out",
		ready => "$dir/ready",
		release_file => "$dir/release",
		err => "$dir/stderr",
		name => join(',', @$channels),
	}, $class;
	my $dsn = sprintf('host=%s port=%s dbname=%s', $node->host, $node->port, $db);
	my @cmd = (
		$python, $script, '--dsn', $dsn, '--out', $self->{out},
		'--ready', $self->{ready},
		'--timeout', $opts{timeout} // 600);
	push @cmd, map { ('--channel', $_) } @$channels;
	push @cmd, '--ack' if $opts{ack};
	push @cmd, '--stuck-until', $self->{release_file} if $opts{stuck};
	open(my $fh, '>', $self->{out}) or die "cannot create $self->{out}: $!";
	close($fh);
	$self->{h} = IPC::Run::start(\@cmd, '<', \undef, '>', "$dir/stdout",
		'2>', $self->{err});

	my $deadline = time + $PostgreSQL::Test::Utils::timeout_default;
	while (!-e $self->{ready})
	{
		if (!$self->{h}->pumpable || time > $deadline)
		{
			$self->{h}->kill_kill;
			die "listener on $self->{name} did not start:\n"
			  . PostgreSQL::Test::Utils::slurp_file($self->{err});
		}
		usleep(20_000);
	}
	chomp($self->{backend_pid} = PostgreSQL::Test::Utils::slurp_file($self->{ready}));
	return $self;
}

# The listener's backend pid.
sub backend_pid { return $_[0]->{backend_pid}; }

# All notifications received so far, in order.
sub messages
{
	my ($self) = @_;
	my @m;
	open(my $fh, '<:raw', $self->{out}) or die "cannot read $self->{out}: $!";
	while (my $line = <$fh>)
	{
		# a line being written has no newline yet: read it next time
		last unless $line =~ /\n\z/;
		my $rec = $json_bytes->decode($line);
		$rec->{msg} = eval { $json_chars->decode($rec->{payload}) };
		push @m, $rec;
	}
	close($fh);
	return @m;
}

# Notifications whose parsed message satisfies $pred (called with $_ set to
# the message hash; the whole record is $_[0]).
sub matching
{
	my ($self, $pred) = @_;
	return grep {
		my $rec = $_;
		local $_ = $rec->{msg} // {};
		$pred->($rec)
	} $self->messages;
}

# Poll until $cond->(@messages) returns true (a non-empty list or true
# scalar); returns the messages then.  Fails the test with $what and the
# messages received if it does not happen within the default timeout.
sub wait_for
{
	my ($self, $cond, $what, $timeout) = @_;
	my $deadline = time + ($timeout // $PostgreSQL::Test::Utils::timeout_default);
	while (1)
	{
		my @m = $self->messages;
		return @m if $cond->(@m);
		if (time > $deadline)
		{
			fail("listener on $self->{name}: $what");
			diag(Encode::encode_utf8("received:\n" . join("\n", map { $_->{payload} } @m))
				  . "\nlistener stderr:\n"
				  . PostgreSQL::Test::Utils::slurp_file($self->{err}));
			return @m;
		}
		usleep(50_000);
	}
}

# Let a stuck listener commit its open transaction.
sub release
{
	my ($self) = @_;
	open(my $fh, '>', $self->{release_file}) or die "cannot create release file: $!";
	close($fh);
	return;
}

# Stop the listener (it may already have exited) and report its stderr if
# it failed.
sub stop
{
	my ($self) = @_;
	my $h = $self->{h};
	# SIGTERM ends the listener at once; kill_kill reaps it
	eval { $h->kill_kill(grace => 5) };
	return;
}

1;
