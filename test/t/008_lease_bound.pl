# Copyright (c) eventbox contributors

# 008_lease_bound.pl: leases run out on time although nobody scans for them.
#
# The worker and claims look for ran-out leases only when the database's
# lease bound (the earliest deadline a committed batch can have, kept in
# shared memory) has passed; claims lower it when they commit.  These
# checks make sure no lease is forgotten:
#
# - a lease taken and not acked runs out and its events become retries;
# - a lease taken in a prepared transaction, committed later by another
#   session (which never lowers the bound), runs out too;
# - after a lease ran out, the next one does as well (the bound was raised
#   and lowered again);
# - claims that ack at once leave nothing behind.

use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('leases');
$node->init;
$node->append_conf(
	'postgresql.conf', qq{
shared_preload_libraries = 'eventbox'
eventbox.naptime = '100ms'
max_prepared_transactions = 5
statement_timeout = '60s'
});
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION eventbox');
$node->safe_psql('postgres',
	"SELECT eventbox.subscribe('lb', '{lb.*}', lease => '1 second', backoff_base => '1 hour', backoff_max => '1 hour')"
);

sub retried
{
	return $node->safe_psql('postgres',
		"SELECT retried_total FROM eventbox.stats WHERE subscription = 'lb'");
}

# acked at once: nothing runs out
$node->safe_psql('postgres', "SELECT eventbox.publish('lb.ev') FROM generate_series(1, 5)");
is( $node->safe_psql(
		'postgres',
		"SELECT eventbox.ack(array_agg(id), 'lb') FROM eventbox.claim_batch(100, 'lb')"),
	'5',
	'five events claimed and acked');

# a lease that is not acked runs out, found by the worker
$node->safe_psql('postgres', "SELECT eventbox.publish('lb.ev') FROM generate_series(1, 3)");
is($node->safe_psql('postgres', "SELECT count(*) FROM eventbox.claim_batch(100, 'lb')"),
	'3', 'three events claimed and not acked');
ok($node->poll_query_until('postgres',
		"SELECT retried_total = 3 FROM eventbox.stats WHERE subscription = 'lb'"),
	'their lease ran out: three retries');

# once more, after the bound was raised
$node->safe_psql('postgres', "SELECT eventbox.publish('lb.ev') FROM generate_series(1, 2)");
is($node->safe_psql('postgres', "SELECT count(*) FROM eventbox.claim_batch(2, 'lb')"),
	'2', 'two more claimed and not acked');
ok($node->poll_query_until('postgres',
		"SELECT retried_total = 5 FROM eventbox.stats WHERE subscription = 'lb'"),
	'their lease ran out as well');

# a lease taken in a prepared transaction
$node->safe_psql('postgres', "SELECT eventbox.publish('lb.ev') FROM generate_series(1, 4)");
$node->safe_psql('postgres', q{
BEGIN;
SELECT count(*) FROM eventbox.claim_batch(4, 'lb');
PREPARE TRANSACTION 'claimed';
});
sleep 2;    # the worker's timers run meanwhile
is(retried(), '5', 'nothing ran out while the claim was prepared');
$node->safe_psql('postgres', "COMMIT PREPARED 'claimed'");
ok($node->poll_query_until('postgres',
		"SELECT retried_total = 9 FROM eventbox.stats WHERE subscription = 'lb'"),
	'the lease of the committed prepared claim ran out');

# and the worker is back to the bound: a further lease runs out too
$node->safe_psql('postgres', "SELECT eventbox.publish('lb.ev')");
is($node->safe_psql('postgres', "SELECT count(*) FROM eventbox.claim_batch(1, 'lb')"),
	'1', 'one more claimed and not acked');
ok($node->poll_query_until('postgres',
		"SELECT retried_total = 10 FROM eventbox.stats WHERE subscription = 'lb'"),
	'its lease ran out');
is( $node->safe_psql('postgres',
		"SELECT leased, scheduled_retries FROM eventbox.stats WHERE subscription = 'lb'"),
	'0|10',
	'nothing is leased, ten retries wait');

$node->stop;
done_testing();
