# eventbox: PGXS build.
#
# Layout: C sources in src/, the versioned install script beside the control
# file, pg_regress tests in sql/ + expected/ (pg_regress's defaults),
# isolation specs in test/isolation/, TAP tests in test/t/.
#
#   make && make install        build and install into the server, and the
#                               eventbox command-line tool into PostgreSQL's
#                               bindir (src/cli/, see docs/cli.md)
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

# PGXS does not track headers: every module object depends on the shared
# one, or a changed struct leaves objects that disagree about its layout.
$(OBJS): src/eventbox.h

# The eventbox command-line tool (src/cli/; not part of the server module,
# which only takes src/*.c).  PGXS's PROGRAM cannot be combined with
# MODULE_big, so it has its own rules.  It is installed into PostgreSQL's
# bindir, next to psql and pg_dump, so that it matches the server version it
# was built against and is found wherever the PostgreSQL tools are.
CLI = src/cli/eventbox
CLI_SRCS = $(wildcard src/cli/*.c)
CLI_CFLAGS = -O2 -g -Wall -Wextra -Werror -I$(shell $(PG_CONFIG) --includedir)
CLI_LIBS = -L$(shell $(PG_CONFIG) --libdir) -lpq -lnats -lpthread

all: $(CLI)

$(CLI): $(CLI_SRCS) src/cli/cli.h
	$(CC) $(CLI_CFLAGS) -o $@ $(CLI_SRCS) $(CLI_LIBS)

install: install-cli

install-cli: $(CLI)
	$(MKDIR_P) '$(DESTDIR)$(bindir)'
	$(INSTALL_PROGRAM) $(CLI) '$(DESTDIR)$(bindir)/eventbox'

uninstall: uninstall-cli

uninstall-cli:
	rm -f '$(DESTDIR)$(bindir)/eventbox'

clean: clean-cli

clean-cli:
	rm -f $(CLI)

.PHONY: install-cli uninstall-cli clean-cli
