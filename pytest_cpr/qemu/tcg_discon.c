/*
 * pytest-cpr: a TCG plugin for QEMU's plugin API 7 (QEMU 11.1.x) that keeps the last RING
 * interrupts and exceptions of each vCPU (type, the PC it left, the PC it went to, a monotonic
 * timestamp) and writes them when QEMU exits. Used on the QEMU that runs the virtual host's L1
 * (CPR_VHOST_TRACE=1): after an L1 triple fault or freeze, `python -m pytest_cpr.vhost discon RUN`
 * names the last events by L1 kernel symbol. Only the entry points this file uses are declared here,
 * as API 7 defines them; a QEMU of another API version refuses to load it.
 */
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#define EXPORT __attribute__((visibility("default")))
#define RING 4096
#define CPUS 64

typedef uint64_t plugin_id;
typedef struct {
    const char *target_name;
    struct { int min; int cur; } version;
    int system_emulation;
} plugin_info;
typedef void (*discon_cb)(unsigned int vcpu, int type, uint64_t from_pc, uint64_t to_pc, void *udata);
typedef void (*exit_cb)(plugin_id id, void *udata);

void qemu_plugin_register_vcpu_discon_cb(plugin_id id, int type, discon_cb cb, void *udata);
void qemu_plugin_register_atexit_cb(plugin_id id, exit_cb cb, void *udata);

EXPORT int qemu_plugin_version = 7;

struct event { uint64_t from_pc, to_pc, ns; int type; };
static struct event ring[CPUS][RING];
static uint64_t seen[CPUS];
static char out[4096] = "tcg-discon.txt";

static void on_discon(unsigned int vcpu, int type, uint64_t from_pc, uint64_t to_pc, void *udata)
{
    struct timespec now;
    struct event *e;

    (void)udata;
    if (vcpu >= CPUS)
        return;
    clock_gettime(CLOCK_MONOTONIC, &now);
    e = &ring[vcpu][seen[vcpu]++ % RING];
    e->from_pc = from_pc;
    e->to_pc = to_pc;
    e->type = type;
    e->ns = (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec;
}

static void on_exit(plugin_id id, void *udata)
{
    FILE *f = fopen(out, "w");

    (void)id;
    (void)udata;
    if (!f)
        return;
    for (unsigned int c = 0; c < CPUS; c++) {
        uint64_t first = seen[c] > RING ? seen[c] - RING : 0;

        for (uint64_t i = first; i < seen[c]; i++) {
            struct event *e = &ring[c][i % RING];

            fprintf(f, "%u %llu %s %016llx %016llx\n", c, (unsigned long long)e->ns,
                    e->type == 1 ? "interrupt" : e->type == 2 ? "exception" : "hostcall",
                    (unsigned long long)e->from_pc, (unsigned long long)e->to_pc);
        }
    }
    fclose(f);
}

EXPORT int qemu_plugin_install(plugin_id id, const plugin_info *info, int argc, char **argv)
{
    (void)info;
    for (int i = 0; i < argc; i++)
        if (!strncmp(argv[i], "out=", 4))
            snprintf(out, sizeof(out), "%s", argv[i] + 4);
    qemu_plugin_register_vcpu_discon_cb(id, -1, on_discon, NULL);
    qemu_plugin_register_atexit_cb(id, on_exit, NULL);
    return 0;
}
