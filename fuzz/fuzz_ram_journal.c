/* fuzz_ram_journal.c - libFuzzer target: arbitrary bytes as the journal of
 * a RAM disk kept in a file (backends/ram_image.c), replayed into a 1 MiB
 * image on memfds.  Whatever it does must stay inside the image: the
 * image's size never changes, and anything but a complete, checksummed
 * journal leaves it untouched. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include "devio/backend.h"
#include "devio/util.h"

#define IMAGE (1u << 20)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	int jfd = memfd_create("journal", 0), ifd = memfd_create("image", 0);
	struct stat st;
	int r;

	devio_log_set_level(DEVIO_LOG_ERROR);
	if (jfd < 0 || ifd < 0 || ftruncate(ifd, IMAGE) || write(jfd, data, size) != (ssize_t)size)
		abort();
	r = devio_ram_journal_replay(jfd, ifd, IMAGE);
	if (fstat(ifd, &st) || st.st_size != IMAGE)
		abort();
	if (r != 0 && st.st_blocks != 0)
		abort(); /* refused, yet written */
	close(jfd);
	close(ifd);
	return 0;
}
