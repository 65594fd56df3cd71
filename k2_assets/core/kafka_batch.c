/* The writer's hot loop over librdkafka: a consumed batch becomes columns, with no Python object per message.
   Declarations come from kafka_batch_build.py (librdkafka's public API). */
#include <string.h>

enum { K2_TOPIC = 0, K2_OTHER = 1, K2_ERROR = 2 };

/* Consume up to `size` messages from the consumer queue (rebalance callbacks are served here too) and sort
   them by kind: the given topic's messages, another topic's, or an error. `*bytes` is what k2_take will copy:
   the topic's payloads, each with a newline. Returns the count, or -1 on an error of the queue itself. */
int64_t k2_consume(rd_kafka_queue_t *queue, int timeout_ms, rd_kafka_message_t **messages, int64_t size,
                   const char *topic, uint8_t *kinds, int64_t *bytes) {
    ssize_t n = rd_kafka_consume_batch_queue(queue, timeout_ms, messages, (size_t)size);
    int64_t total = 0;
    for (ssize_t i = 0; i < n; i++) {
        const rd_kafka_message_t *m = messages[i];
        if (m->err) {
            kinds[i] = K2_ERROR;
        } else if (strcmp(rd_kafka_topic_name(m->rkt), topic) == 0) {
            kinds[i] = K2_TOPIC;
            total += (int64_t)m->len + 1;
        } else {
            kinds[i] = K2_OTHER;
        }
    }
    *bytes = total;
    return (int64_t)n;
}

/* Copy the topic's messages out, in order, and free them; the others stay for the caller.
   Message j's value is data[starts[j] .. starts[j + 1] - 1), and a newline follows it. Returns how many. */
int64_t k2_take(rd_kafka_message_t **messages, int64_t n, const uint8_t *kinds, uint8_t *data, int32_t *starts,
                int32_t *partitions, int64_t *offsets) {
    int64_t at = 0, j = 0;
    for (int64_t i = 0; i < n; i++) {
        rd_kafka_message_t *m = messages[i];
        if (kinds[i] != K2_TOPIC) continue;
        starts[j] = (int32_t)at;
        if (m->len) memcpy(data + at, m->payload, m->len);
        at += (int64_t)m->len;
        data[at++] = '\n';
        partitions[j] = m->partition;
        offsets[j] = m->offset;
        j++;
        rd_kafka_message_destroy(m);
        messages[i] = NULL;
    }
    starts[j] = (int32_t)at;
    return j;
}
