/* rmem [-8] FILE OFFSET [VALUE]: read (print 0x%08x) or write one aligned little-endian u32
 * at OFFSET of FILE through mmap, the way a guest program maps
 * /sys/bus/pci/devices/BDF/resourceN (MMIO resource files cannot be read(), only mmapped).
 * -8: one aligned u64 instead (printed 0x%016llx), written with a single 8-byte store as a
 * program writing one word of the shared header would.
 * Built static for the e2e initramfs. */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

int main(int argc, char **argv) {
    int wide = argc > 1 && strcmp(argv[1], "-8") == 0;
    if (wide) {
        argv++;
        argc--;
    }
    if (argc != 3 && argc != 4) {
        fprintf(stderr, "usage: rmem [-8] FILE OFFSET [VALUE]\n");
        return 2;
    }
    unsigned long long off = strtoull(argv[2], NULL, 0);
    if (off & (wide ? 7 : 3)) { fprintf(stderr, "rmem: unaligned offset\n"); return 2; }
    long pg = sysconf(_SC_PAGESIZE);
    unsigned long long base = off & ~(unsigned long long)(pg - 1);
    int fd = open(argv[1], argc == 4 ? O_RDWR | O_SYNC : O_RDONLY | O_SYNC);
    if (fd < 0) { perror("rmem: open"); return 1; }
    void *p = mmap(NULL, pg, argc == 4 ? PROT_READ | PROT_WRITE : PROT_READ, MAP_SHARED, fd, (off_t)base);
    if (p == MAP_FAILED) { perror("rmem: mmap"); return 1; }
    char *at = (char *)p + (off - base);
    if (wide) {
        volatile uint64_t *w = (volatile uint64_t *)at;
        if (argc == 4)
            *w = (uint64_t)strtoull(argv[3], NULL, 0);
        else
            printf("0x%016llx\n", (unsigned long long)*w);
    } else {
        volatile uint32_t *w = (volatile uint32_t *)at;
        if (argc == 4)
            *w = (uint32_t)strtoull(argv[3], NULL, 0);
        else
            printf("0x%08x\n", *w);
    }
    munmap(p, pg);
    close(fd);
    return 0;
}
