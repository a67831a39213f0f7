//! The librdkafka producer as the drain thread uses it: topic handles created once, records
//! enqueued with `rd_kafka_produceva`, headers built straight into librdkafka's header list.
//!
//! Why not `BaseProducer::send`: it allocates a `CString` for the topic name on every call and
//! `rd_kafka_producev` then looks the topic up by name under librdkafka's global lock. A topic
//! handle (`rd_kafka_topic_t`) skips both. Delivery reports still flow through rust-rdkafka's
//! `BaseProducer::poll` into [`super::delivery::DeliveryContext`]: the opaque passed here is
//! the `usize` that context receives.
//!
//! All `unsafe` of the sink lives in this file; every pointer handed to librdkafka is either
//! owned by it after a successful call (headers) or copied by it before the call returns
//! (`RD_KAFKA_MSG_F_COPY` for key and value).
//!
//! With [`Partitioning::Instance`] each topic handle gets a copy of the default topic
//! configuration plus a partitioner callback ([`instance_partitioner`]); see
//! [`super::partitioning`].

use std::ffi::CString;
use std::os::raw::c_void;

use rdkafka::bindings as rdsys;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, Producer as _, PurgeConfig};
use rdkafka::types::RDKafkaErrorCode;

use super::delivery::DeliveryContext;
use super::partitioning::{pick, Partitioning};

/// One topic handle; destroyed before the producer (field order in [`Producer`]).
struct TopicHandle(*mut rdsys::rd_kafka_topic_t);

impl Drop for TopicHandle {
    fn drop(&mut self) {
        // SAFETY: created by rd_kafka_topic_new, destroyed once; librdkafka keeps its own
        // references for messages still queued on the topic.
        unsafe { rdsys::rd_kafka_topic_destroy(self.0) }
    }
}

// SAFETY: librdkafka topic handles are thread-safe reference-counted objects.
unsafe impl Send for TopicHandle {}

/// Header list under construction; freed unless librdkafka took ownership.
pub struct Headers {
    ptr: *mut rdsys::rd_kafka_headers_t,
}

impl Headers {
    /// An empty list with room for `n` headers.
    pub fn with_capacity(n: usize) -> Headers {
        // SAFETY: plain constructor.
        Headers {
            ptr: unsafe { rdsys::rd_kafka_headers_new(n) },
        }
    }

    /// Appends one header (librdkafka copies name and value).
    pub fn add(&mut self, name: &str, value: &[u8]) {
        // SAFETY: sizes are given explicitly, so neither needs a terminating NUL.
        unsafe {
            rdsys::rd_kafka_header_add(
                self.ptr,
                name.as_ptr().cast(),
                name.len() as isize,
                value.as_ptr().cast(),
                value.len() as isize,
            );
        }
    }
}

impl Drop for Headers {
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: still ours (not handed to a successful produce).
            unsafe { rdsys::rd_kafka_headers_destroy(self.ptr) }
        }
    }
}

/// librdkafka's partitioner callback for [`Partitioning::Instance`]: `rkt_opaque` holds the
/// packed seed and partitions per instance. Records without a key (error events of a
/// connection that never sent `start`) would go to librdkafka's sticky partitioner, a random
/// partition, without calling this; [`Producer::new`] sets `sticky.partitioning.linger.ms=0`
/// in this mode, so they arrive here too and stay on the instance's partitions (the one an
/// empty key picks).
unsafe extern "C" fn instance_partitioner(
    rkt: *const rdsys::rd_kafka_topic_t,
    keydata: *const c_void,
    keylen: usize,
    partition_cnt: i32,
    rkt_opaque: *mut c_void,
    msg_opaque: *mut c_void,
) -> i32 {
    if partition_cnt <= 0 {
        // SAFETY: called from within a partitioner callback, as librdkafka requires.
        return unsafe {
            rdsys::rd_kafka_msg_partitioner_consistent_random(
                rkt,
                keydata,
                keylen,
                partition_cnt,
                rkt_opaque,
                msg_opaque,
            )
        };
    }
    let (seed, per_instance) = Partitioning::from_opaque(rkt_opaque as usize);
    let key: &[u8] = if keydata.is_null() || keylen == 0 {
        &[]
    } else {
        // SAFETY: librdkafka passes the record's key, `keylen` bytes, valid for the call.
        unsafe { std::slice::from_raw_parts(keydata.cast::<u8>(), keylen) }
    };
    pick(seed, per_instance, key, partition_cnt)
}

/// A producer plus one handle per topic slot.
pub struct Producer {
    topics: Vec<TopicHandle>,
    inner: BaseProducer<DeliveryContext>,
}

/// Why a produce call was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProduceError(pub RDKafkaErrorCode);

impl Producer {
    /// Creates the producer and a handle for each of `topics` (slot order), partitioned as
    /// `partitioning` says.
    pub fn new(
        config: &ClientConfig,
        context: DeliveryContext,
        topics: &[String],
        partitioning: Partitioning,
    ) -> Result<Producer, rdkafka::error::KafkaError> {
        let inner: BaseProducer<DeliveryContext> = match partitioning.to_opaque() {
            // Unkeyed records reach the instance partitioner only without sticky partitioning
            // (see `instance_partitioner`); an explicit `--kafka-option` setting is kept.
            Some(_) if config.get("sticky.partitioning.linger.ms").is_none() => config
                .clone()
                .set("sticky.partitioning.linger.ms", "0")
                .create_with_context(context)?,
            _ => config.create_with_context(context)?,
        };
        let rk = inner.client().native_ptr();
        let mut handles = Vec::with_capacity(topics.len());
        for name in topics {
            let c = CString::new(name.as_str()).map_err(|_| {
                rdkafka::error::KafkaError::ClientCreation(format!("topic name {name:?}"))
            })?;
            let conf = match partitioning.to_opaque() {
                None => std::ptr::null_mut(),
                // SAFETY: rk is live; the duplicate starts from the producer's default topic
                // settings (acks, timeouts, ...), so only the partitioner differs. The opaque
                // is plain bits read back by `instance_partitioner`, never dereferenced.
                Some(bits) => unsafe {
                    let conf = rdsys::rd_kafka_default_topic_conf_dup(rk);
                    rdsys::rd_kafka_topic_conf_set_partitioner_cb(conf, Some(instance_partitioner));
                    rdsys::rd_kafka_topic_conf_set_opaque(conf, bits as *mut c_void);
                    conf
                },
            };
            // SAFETY: rk is live for the call; a null config means topic defaults; a non-null
            // one is owned by librdkafka from here on (freed by it on failure too).
            let t = unsafe { rdsys::rd_kafka_topic_new(rk, c.as_ptr(), conf) };
            if t.is_null() {
                return Err(rdkafka::error::KafkaError::ClientCreation(format!(
                    "topic handle for {name}"
                )));
            }
            handles.push(TopicHandle(t));
        }
        Ok(Producer {
            topics: handles,
            inner,
        })
    }

    /// Enqueues one record on `slot`'s topic (partition chosen by the partitioner from the key).
    /// `opaque` comes back in the delivery report. On success librdkafka owns `headers`.
    /// `timestamp_ms` is the record's CreateTime (unix ms; the gateway passes the receive time
    /// of the record's first chunk, decision 50); 0 lets librdkafka read the clock.
    pub fn produce(
        &self,
        slot: usize,
        key: Option<&[u8]>,
        value: &[u8],
        headers: Option<Headers>,
        opaque: usize,
        timestamp_ms: i64,
    ) -> Result<(), ProduceError> {
        use rdsys::rd_kafka_vtype_t as V;
        let zero = rdsys::rd_kafka_vu_t {
            vtype: V::RD_KAFKA_VTYPE_END,
            u: rdsys::rd_kafka_vu_s__bindgen_ty_1 { i: 0 },
        };
        let mut vus = [zero; 8];
        let mut n = 0;
        let mut push = |vtype: V, u: rdsys::rd_kafka_vu_s__bindgen_ty_1| {
            vus[n] = rdsys::rd_kafka_vu_t { vtype, u };
            n += 1;
        };
        let Some(topic) = self.topics.get(slot) else {
            return Err(ProduceError(RDKafkaErrorCode::UnknownTopic));
        };
        push(
            V::RD_KAFKA_VTYPE_RKT,
            rdsys::rd_kafka_vu_s__bindgen_ty_1 { rkt: topic.0 },
        );
        push(
            V::RD_KAFKA_VTYPE_MSGFLAGS,
            rdsys::rd_kafka_vu_s__bindgen_ty_1 {
                i: rdsys::RD_KAFKA_MSG_F_COPY,
            },
        );
        push(
            V::RD_KAFKA_VTYPE_VALUE,
            rdsys::rd_kafka_vu_s__bindgen_ty_1 {
                mem: rdsys::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_1 {
                    ptr: value.as_ptr() as *mut c_void,
                    size: value.len(),
                },
            },
        );
        if let Some(key) = key {
            push(
                V::RD_KAFKA_VTYPE_KEY,
                rdsys::rd_kafka_vu_s__bindgen_ty_1 {
                    mem: rdsys::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_1 {
                        ptr: key.as_ptr() as *mut c_void,
                        size: key.len(),
                    },
                },
            );
        }
        push(
            V::RD_KAFKA_VTYPE_OPAQUE,
            rdsys::rd_kafka_vu_s__bindgen_ty_1 {
                ptr: opaque as *mut c_void,
            },
        );
        if timestamp_ms > 0 {
            push(
                V::RD_KAFKA_VTYPE_TIMESTAMP,
                rdsys::rd_kafka_vu_s__bindgen_ty_1 { i64_: timestamp_ms },
            );
        }
        let mut headers = headers;
        if let Some(h) = &headers {
            push(
                V::RD_KAFKA_VTYPE_HEADERS,
                rdsys::rd_kafka_vu_s__bindgen_ty_1 { headers: h.ptr },
            );
        }
        // SAFETY: every pointer in `vus` is valid for the duration of the call; key and value
        // are copied (F_COPY); the headers list is taken over only on success.
        let err =
            unsafe { rdsys::rd_kafka_produceva(self.inner.client().native_ptr(), vus.as_ptr(), n) };
        if err.is_null() {
            if let Some(h) = headers.as_mut() {
                h.ptr = std::ptr::null_mut(); // librdkafka owns it now
            }
            return Ok(());
        }
        // SAFETY: a non-null error object is ours to read and destroy.
        let code = unsafe {
            let c = rdsys::rd_kafka_error_code(err);
            rdsys::rd_kafka_error_destroy(err);
            c
        };
        Err(ProduceError(code.into()))
    }

    /// Serves delivery reports, statistics and errors without blocking: `BaseProducer::poll`
    /// serves one event (one batch of reports) per call, so poll until a call finds nothing.
    /// Returns the number of events served.
    pub fn poll(&self) -> usize {
        let events = &self.inner.context().events;
        let mut served = 0;
        for _ in 0..4096 {
            let before = events.get();
            self.inner.poll(std::time::Duration::ZERO);
            if events.get() == before {
                break;
            }
            served += 1;
        }
        served
    }

    /// Drops everything librdkafka still holds and serves the reports (each a failure with
    /// `PurgeQueue`/`PurgeInflight`, or the fatal error), waiting up to 2 s for them.
    pub fn purge(&self) {
        self.inner.purge(PurgeConfig::default().queue().inflight());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while self.inner.in_flight_count() > 0 && std::time::Instant::now() < deadline {
            self.inner.poll(std::time::Duration::from_millis(10));
        }
        self.poll();
    }

    /// Records librdkafka still holds.
    pub fn in_flight(&self) -> i32 {
        self.inner.in_flight_count()
    }

    /// The fatal error, if the producer has hit one.
    pub fn fatal_error(&self) -> Option<(RDKafkaErrorCode, String)> {
        self.inner.client().fatal_error()
    }

    /// The delivery context (fatal flag, statistics).
    pub fn context(&self) -> &DeliveryContext {
        self.inner.context()
    }

    /// Test hook: makes librdkafka raise a fatal error as if the broker had reported one
    /// (`rd_kafka_test_fatal_error`).
    pub fn inject_fatal_error(&self, reason: &str) {
        let reason = CString::new(reason).unwrap_or_default();
        // SAFETY: rk is live; reason is NUL-terminated.
        unsafe {
            rdsys::rd_kafka_test_fatal_error(
                self.inner.client().native_ptr(),
                rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
                reason.as_ptr(),
            );
        }
    }
}
