# libvhdio: build, test and install. `cargo build --release` alone also works.
PREFIX  ?= /usr/local
BINDIR  ?= $(PREFIX)/bin
LIBDIR  ?= $(PREFIX)/lib
MANDIR  ?= $(PREFIX)/share/man
CARGO   ?= cargo
TARGET  ?= target/release
# nbdkit's plugin folder, where `nbdkit vhdio file=...` finds the plugin.
NBDKIT_PLUGINDIR ?= $(shell nbdkit --dump-config 2>/dev/null | sed -n 's/^plugindir=//p')

.PHONY: all test install uninstall demo

all:
	$(CARGO) build --release --workspace

test:
	$(CARGO) test --release --workspace

demo: all
	scripts/demo

install: all
	install -D -m 0755 $(TARGET)/libvhdio.so $(DESTDIR)$(LIBDIR)/libvhdio.so
	install -D -m 0755 $(TARGET)/vhdpartx $(DESTDIR)$(BINDIR)/vhdpartx
	if [ -f $(TARGET)/vhdio ]; then install -D -m 0755 $(TARGET)/vhdio $(DESTDIR)$(BINDIR)/vhdio; fi
	if [ -z "$(NBDKIT_PLUGINDIR)" ]; then \
		echo "nbdkit not found: the nbdkit plugin is not installed (apt-get install nbdkit, or set NBDKIT_PLUGINDIR)"; \
	elif [ -f $(TARGET)/libnbdkit_vhdio.so ]; then \
		install -D -m 0755 $(TARGET)/libnbdkit_vhdio.so $(DESTDIR)$(NBDKIT_PLUGINDIR)/nbdkit-vhdio-plugin.so; \
	fi
	install -D -m 0644 man/libvhdio.7 $(DESTDIR)$(MANDIR)/man7/libvhdio.7
	install -D -m 0644 man/vhdpartx.8 $(DESTDIR)$(MANDIR)/man8/vhdpartx.8
	install -D -m 0644 man/vhdio.1 $(DESTDIR)$(MANDIR)/man1/vhdio.1

uninstall:
	rm -f $(DESTDIR)$(LIBDIR)/libvhdio.so $(DESTDIR)$(BINDIR)/vhdpartx $(DESTDIR)$(BINDIR)/vhdio
	if [ -n "$(NBDKIT_PLUGINDIR)" ]; then rm -f $(DESTDIR)$(NBDKIT_PLUGINDIR)/nbdkit-vhdio-plugin.so; fi
	rm -f $(DESTDIR)$(MANDIR)/man7/libvhdio.7 $(DESTDIR)$(MANDIR)/man8/vhdpartx.8 $(DESTDIR)$(MANDIR)/man1/vhdio.1
