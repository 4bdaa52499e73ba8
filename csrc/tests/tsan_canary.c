/* Built only with -Dtsan=true: two threads write one plain int with no synchronisation. TSan
 * must report it, which tests/test_c_units.py checks, so a TSan build that reports nothing means
 * the code is race-free and not that the sanitizer is off. */
#include <pthread.h>
#include <stdio.h>

static int shared;

static void *writer(void *arg)
{
    (void)arg;
    for (int i = 0; i < 1000; i++)
        shared++; /* the race */
    return NULL;
}

int main(void)
{
    pthread_t a, b;
    pthread_create(&a, NULL, writer, NULL);
    pthread_create(&b, NULL, writer, NULL);
    pthread_join(a, NULL);
    pthread_join(b, NULL);
    printf("tsan_canary: %d\n", shared);
    return 0;
}
