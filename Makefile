# eventbox: PGXS build.
#
# Layout: C sources in src/, the versioned install script beside the control
# file, pg_regress tests in sql/ + expected/ (pg_regress's defaults),
# isolation specs in test/isolation/, TAP tests in test/t/.
#
#   make && make install        build and install into the server
#   make installcheck           regress + isolation + TAP, each on its own
#                               throwaway instance (run as a non-root user)

EXTENSION = eventbox
MODULE_big = eventbox
OBJS = $(patsubst %.c,%.o,$(wildcard src/*.c))
DATA = $(wildcard eventbox--*.sql)

PG_CONFIG ?= pg_config
PG_CPPFLAGS = -Wall -Wextra -Werror -Wno-unused-parameter -Wno-missing-field-initializers -Isrc

REGRESS = $(patsubst sql/%.sql,%,$(sort $(wildcard sql/*.sql)))
REGRESS_OPTS = --temp-config=$(srcdir)/test/eventbox.conf \
	--temp-instance=./tmp_check_regress

ISOLATION = $(patsubst test/isolation/specs/%.spec,%,$(sort $(wildcard test/isolation/specs/*.spec)))
ISOLATION_OPTS = --inputdir=$(srcdir)/test/isolation \
	--outputdir=./output_iso \
	--temp-config=$(srcdir)/test/eventbox.conf \
	--temp-instance=./tmp_check_iso

TAP_TESTS = 1
PROVE_TESTS = test/t/*.pl

EXTRA_CLEAN = tmp_check_regress tmp_check_iso output_iso results \
	regression.diffs regression.out

PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)
