"""Builds k2_assets.core._kafka_batch from kafka_batch.c at install (setup.py's cffi_modules).

The module calls librdkafka, the copy confluent-kafka's wheel ships: its symbols are left undefined here and
bound when kafka_batch.py loads that library first. The declarations below are librdkafka's public C API (rdkafka.h,
unchanged since 1.6), only the part K2 calls."""

from pathlib import Path

from cffi import FFI

RDKAFKA = """
typedef int rd_kafka_resp_err_t;
typedef struct rd_kafka_s rd_kafka_t;
typedef struct rd_kafka_conf_s rd_kafka_conf_t;
typedef struct rd_kafka_queue_s rd_kafka_queue_t;
typedef struct rd_kafka_topic_s rd_kafka_topic_t;
typedef struct rd_kafka_error_s rd_kafka_error_t;
typedef struct rd_kafka_headers_s rd_kafka_headers_t;
typedef struct rd_kafka_message_s {
    rd_kafka_resp_err_t err;
    rd_kafka_topic_t *rkt;
    int32_t partition;
    void *payload;
    size_t len;
    void *key;
    size_t key_len;
    int64_t offset;
    void *_private;
} rd_kafka_message_t;
typedef struct rd_kafka_topic_partition_s {
    char *topic;
    int32_t partition;
    int64_t offset;
    void *metadata;
    size_t metadata_size;
    void *opaque;
    rd_kafka_resp_err_t err;
    void *_private;
} rd_kafka_topic_partition_t;
typedef struct rd_kafka_topic_partition_list_s {
    int cnt;
    int size;
    rd_kafka_topic_partition_t *elems;
} rd_kafka_topic_partition_list_t;

rd_kafka_conf_t *rd_kafka_conf_new(void);
void rd_kafka_conf_destroy(rd_kafka_conf_t *conf);
int rd_kafka_conf_set(rd_kafka_conf_t *conf, const char *name, const char *value, char *errstr, size_t errstr_size);
void rd_kafka_conf_set_opaque(rd_kafka_conf_t *conf, void *opaque);
void rd_kafka_conf_set_rebalance_cb(rd_kafka_conf_t *conf,
    void (*rebalance_cb)(rd_kafka_t *rk, rd_kafka_resp_err_t err, rd_kafka_topic_partition_list_t *partitions, void *opaque));
void rd_kafka_conf_set_error_cb(rd_kafka_conf_t *conf,
    void (*error_cb)(rd_kafka_t *rk, int err, const char *reason, void *opaque));
void rd_kafka_conf_set_log_cb(rd_kafka_conf_t *conf,
    void (*log_cb)(const rd_kafka_t *rk, int level, const char *fac, const char *buf));
rd_kafka_resp_err_t rd_kafka_set_log_queue(rd_kafka_t *rk, rd_kafka_queue_t *rkqu);
rd_kafka_t *rd_kafka_new(int type, rd_kafka_conf_t *conf, char *errstr, size_t errstr_size);
void rd_kafka_destroy(rd_kafka_t *rk);
void rd_kafka_destroy_flags(rd_kafka_t *rk, int flags);
rd_kafka_resp_err_t rd_kafka_poll_set_consumer(rd_kafka_t *rk);
rd_kafka_queue_t *rd_kafka_queue_get_consumer(rd_kafka_t *rk);
ssize_t rd_kafka_consume_batch_queue(rd_kafka_queue_t *rkqu, int timeout_ms, rd_kafka_message_t **rkmessages,
    size_t rkmessages_size);
void rd_kafka_queue_destroy(rd_kafka_queue_t *rkqu);
rd_kafka_resp_err_t rd_kafka_subscribe(rd_kafka_t *rk, const rd_kafka_topic_partition_list_t *topics);
rd_kafka_topic_partition_list_t *rd_kafka_topic_partition_list_new(int size);
void rd_kafka_topic_partition_list_destroy(rd_kafka_topic_partition_list_t *rkparlist);
rd_kafka_topic_partition_t *rd_kafka_topic_partition_list_add(rd_kafka_topic_partition_list_t *rktparlist,
    const char *topic, int32_t partition);
rd_kafka_resp_err_t rd_kafka_assign(rd_kafka_t *rk, const rd_kafka_topic_partition_list_t *partitions);
rd_kafka_error_t *rd_kafka_incremental_assign(rd_kafka_t *rk, const rd_kafka_topic_partition_list_t *partitions);
rd_kafka_error_t *rd_kafka_incremental_unassign(rd_kafka_t *rk, const rd_kafka_topic_partition_list_t *partitions);
int rd_kafka_assignment_lost(rd_kafka_t *rk);
rd_kafka_resp_err_t rd_kafka_commit(rd_kafka_t *rk, const rd_kafka_topic_partition_list_t *offsets, int async);
rd_kafka_resp_err_t rd_kafka_get_watermark_offsets(rd_kafka_t *rk, const char *topic, int32_t partition, int64_t *low,
    int64_t *high);
rd_kafka_resp_err_t rd_kafka_consumer_close(rd_kafka_t *rk);
const char *rd_kafka_err2str(rd_kafka_resp_err_t err);
rd_kafka_resp_err_t rd_kafka_error_code(const rd_kafka_error_t *error);
const char *rd_kafka_error_string(const rd_kafka_error_t *error);
void rd_kafka_error_destroy(rd_kafka_error_t *error);
void rd_kafka_message_destroy(rd_kafka_message_t *rkmessage);
rd_kafka_resp_err_t rd_kafka_message_headers(const rd_kafka_message_t *rkmessage, rd_kafka_headers_t **hdrsp);
rd_kafka_resp_err_t rd_kafka_header_get_all(const rd_kafka_headers_t *hdrs, size_t idx, const char **namep,
    const void **valuep, size_t *sizep);
const char *rd_kafka_topic_name(const rd_kafka_topic_t *rkt);
"""

ffibuilder = FFI()
ffibuilder.cdef(
    RDKAFKA
    + """
    int64_t k2_consume(rd_kafka_queue_t *queue, int timeout_ms, rd_kafka_message_t **messages, int64_t size,
                       const char *topic, uint8_t *kinds, int64_t *bytes);
    int64_t k2_take(rd_kafka_message_t **messages, int64_t n, const uint8_t *kinds, uint8_t *data, int32_t *starts,
                    int32_t *partitions, int64_t *offsets);
    extern "Python" void k2_error(rd_kafka_t *, int, const char *, void *);
    extern "Python" void k2_log(const rd_kafka_t *, int, const char *, const char *);
    extern "Python" void k2_rebalance(rd_kafka_t *, rd_kafka_resp_err_t, rd_kafka_topic_partition_list_t *, void *);
    """
)
ffibuilder.set_source(
    "k2_assets.core._kafka_batch",
    "#include <stdint.h>\n#include <stddef.h>\n#include <sys/types.h>\n"
    + RDKAFKA
    + Path(__file__).with_name("kafka_batch.c").read_text(),
    extra_compile_args=["-O2"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
