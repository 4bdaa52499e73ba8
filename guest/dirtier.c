/* dirtier: increments one byte (or word) per page of its slice, QEMU a-b-bootblock style,
 * at a rate throttled against the clock port, and logs clock gaps for downtime. The loop
 * itself is workload.h, shared with vfdrv. */
#include "workload.h"

void guest_main(uint32_t id)
{
    workload_run(id, 0);
}
