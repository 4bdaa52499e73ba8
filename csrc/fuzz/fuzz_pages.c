/* Page channel records (recv.c) from bytes into a fake VM's RAM: the decoder a destination runs
 * on every page channel. Input: byte 0 picks the channel count (1..4, low bits) and the channel
 * (high bits); the rest is what arrives on the channel. */
#include "fuzz.h"
#include "vfmig/channels.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct vfmig_vm *vm;
    static struct vfmig_receiver r;
    if (size < 1)
        return 0;
    if (!vm)
        vm = fuzz_fake_vm();
    uint32_t nchan = 1 + data[0] % 4, c = (uint32_t)(data[0] >> 4) % nchan;
    struct vfmig_err err = {{0}};
    FUZZ_ASSERT(vfmig_receiver_init(&r, vm, NULL, nchan, &err) == 0);
    int rc = vfmig_receiver_decode_mem(&r, c, data + 1, size - 1);
    struct vfmig_chan_rx *ch = &r.ch[c];
    char prefix[32];
    snprintf(prefix, sizeof(prefix), "channel %u: ", c);
    if (rc == 0) {
        FUZZ_ASSERT(ch->done);
        FUZZ_ASSERT(ch->records == ch->digest.records);
    } else {
        /* Every rejection is one line naming its channel. */
        FUZZ_ASSERT(!ch->done && strncmp(r.err.msg, prefix, strlen(prefix)) == 0);
        FUZZ_ASSERT(strchr(r.err.msg, '\n') == NULL);
    }
    /* Only this channel's stripes were written. */
    for (uint64_t w = 0; w < (vm->npages + 63) / 64; w++) {
        for (uint64_t bits = r.written[w]; bits; bits &= bits - 1) {
            uint64_t p = w * 64 + (uint64_t)__builtin_ctzll(bits);
            FUZZ_ASSERT(p / VFMIG_STRIPE_PAGES % nchan == c);
        }
    }
    vfmig_receiver_free(&r);
    return 0;
}
