/*
 * workload.c - the default guest workload for faultline's Linux guest.
 *
 * Usage: workload [MIB]      (MIB defaults to 16)
 *
 * Maps MIB MiB of anonymous memory, writes a pattern into every word of
 * every page (so every page is really faulted in and dirtied), then folds
 * one word per page into a 64-bit checksum and prints:
 *
 *     workload: pages=<n> checksum=<16 hex digits>
 *
 * The pattern depends only on the page and word index, so the checksum is
 * a pure function of MIB and the page size: a host-side test can compute
 * the expected value and compare it with what the guest printed.
 *
 * Built by build.sh with: gcc -static -O2
 */
#include <errno.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define DEFAULT_MIB 16UL

/* The value stored at word `word` of page `page`. */
static uint64_t pattern(uint64_t page, uint64_t word)
{
	return (page * 0x9e3779b97f4a7c15ULL) ^ (word << 32) ^ 0xfa171e00ULL;
}

int main(int argc, char **argv)
{
	unsigned long mib = DEFAULT_MIB;

	if (argc > 2) {
		fprintf(stderr, "usage: %s [MIB]\n", argv[0]);
		return 2;
	}
	if (argc == 2) {
		char *end;

		errno = 0;
		mib = strtoul(argv[1], &end, 10);
		if (errno != 0 || end == argv[1] || *end != '\0' || mib == 0) {
			fprintf(stderr, "workload: bad size '%s' (want MiB > 0)\n", argv[1]);
			return 2;
		}
	}

	long page_size = sysconf(_SC_PAGESIZE);
	if (page_size <= 0)
		page_size = 4096;

	size_t bytes = (size_t)mib << 20;
	size_t pages = bytes / (size_t)page_size;
	size_t words_per_page = (size_t)page_size / sizeof(uint64_t);

	/* mmap rather than malloc: page aligned, and nothing is touched yet. */
	uint64_t *mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
			     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED) {
		fprintf(stderr, "workload: mmap of %lu MiB failed: %s\n", mib, strerror(errno));
		return 1;
	}

	/* Touch every page: fill every word with its pattern value. */
	for (size_t p = 0; p < pages; p++) {
		uint64_t *page = mem + p * words_per_page;

		for (size_t w = 0; w < words_per_page; w++)
			page[w] = pattern(p, w);
	}

	/*
	 * Checksum one word per page (FNV-1a style over 64-bit words). The
	 * sampled word moves through the page so different offsets get read.
	 */
	uint64_t sum = 0xcbf29ce484222325ULL;
	for (size_t p = 0; p < pages; p++) {
		volatile uint64_t *page = mem + p * words_per_page;

		sum ^= page[p % words_per_page];
		sum *= 0x100000001b3ULL;
	}

	printf("workload: pages=%zu checksum=%016" PRIx64 "\n", pages, sum);
	fflush(stdout);
	munmap(mem, bytes);
	return 0;
}
