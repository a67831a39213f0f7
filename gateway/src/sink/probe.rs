//! The broker probe behind `/readyz`: a metadata request for one of the gateway's own topics
//! (not the whole cluster's metadata, which on a large cluster is megabytes every probe), on
//! its own client built from the shared [`KafkaOptions`].

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};

use super::kafka_config::KafkaOptions;
use super::SinkError;

/// A metadata client for readiness.
pub struct BrokerProbe {
    client: BaseConsumer,
    topic: String,
}

impl BrokerProbe {
    /// A probe asking about `topic`.
    pub fn new(kafka: &KafkaOptions, topic: &str) -> Result<BrokerProbe, SinkError> {
        let client = kafka
            .client_config()
            .create()
            .map_err(|e| SinkError::Client(kafka.describe_error(&e)))?;
        Ok(BrokerProbe {
            client,
            topic: topic.to_owned(),
        })
    }

    /// True when the brokers answered for the topic and every partition has a leader.
    /// Blocking, up to `timeout`.
    pub fn probe(&self, timeout: Duration) -> bool {
        match self.client.fetch_metadata(Some(&self.topic), timeout) {
            Ok(md) => md.topics().iter().any(|t| {
                t.name() == self.topic
                    && t.error().is_none()
                    && !t.partitions().is_empty()
                    && t.partitions().iter().all(|p| p.leader() >= 0)
            }),
            Err(_) => false,
        }
    }
}
