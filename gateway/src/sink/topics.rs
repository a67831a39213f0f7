//! Start-up topic check: the gateway's topics must exist, or be created when allowed. Every
//! client here is built from the same [`KafkaOptions`] as the producer (security included).

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;

use super::kafka_config::KafkaOptions;
use super::SinkError;

/// What to ensure.
#[derive(Debug, Clone)]
pub struct TopicPlan {
    /// Connection and security settings.
    pub kafka: KafkaOptions,
    /// Topics the gateway needs.
    pub topics: Vec<String>,
    /// Create missing ones.
    pub create: bool,
    /// Partitions of created topics.
    pub partitions: i32,
    /// Replication factor of created topics.
    pub replication: i32,
}

/// Names of topics that exist on the cluster (blocking metadata request).
fn existing_topics(kafka: &KafkaOptions, timeout: Duration) -> Result<Vec<String>, SinkError> {
    let consumer: BaseConsumer = kafka
        .client_config()
        .create()
        .map_err(|e| SinkError::Client(kafka.describe_error(&e)))?;
    let md = consumer
        .fetch_metadata(None, timeout)
        .map_err(|e| SinkError::Unreachable {
            brokers: kafka.brokers.clone(),
            detail: kafka.redact(&e.to_string()),
        })?;
    Ok(md
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| t.name().to_owned())
        .collect())
}

/// Partitions of `topic` (blocking metadata requests). A topic created a moment ago may be
/// absent from, or in error in, the first metadata answers (seen with the local broker under
/// load): it is asked again every 100 ms until `timeout`, and only then reported missing.
pub fn partition_count(
    kafka: &KafkaOptions,
    topic: &str,
    timeout: Duration,
) -> Result<i32, SinkError> {
    let consumer: BaseConsumer = kafka
        .client_config()
        .create()
        .map_err(|e| SinkError::Client(kafka.describe_error(&e)))?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let md = consumer
            .fetch_metadata(Some(topic), left.max(Duration::from_millis(100)))
            .map_err(|e| SinkError::Unreachable {
                brokers: kafka.brokers.clone(),
                detail: kafka.redact(&e.to_string()),
            })?;
        let count = md
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map(|t| t.partitions().len() as i32)
            .filter(|n| *n > 0);
        match count {
            Some(n) => return Ok(n),
            None if std::time::Instant::now() >= deadline => {
                return Err(SinkError::MissingTopics(vec![topic.to_owned()]))
            }
            None => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Ensures the topics exist; creates missing ones when allowed. Blocking for up to about
/// twice `timeout`: run it on a blocking thread.
pub async fn ensure_topics(plan: &TopicPlan, timeout: Duration) -> Result<(), SinkError> {
    let kafka = plan.kafka.clone();
    let existing = tokio::task::spawn_blocking(move || existing_topics(&kafka, timeout))
        .await
        .map_err(|e| SinkError::Client(e.to_string()))??;
    let missing: Vec<String> = plan
        .topics
        .iter()
        .filter(|t| !existing.contains(t))
        .cloned()
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !plan.create {
        return Err(SinkError::MissingTopics(missing));
    }
    let admin: AdminClient<DefaultClientContext> = plan
        .kafka
        .client_config()
        .create()
        .map_err(|e| SinkError::Client(plan.kafka.describe_error(&e)))?;
    let new: Vec<NewTopic<'_>> = missing
        .iter()
        .map(|t| {
            NewTopic::new(
                t,
                plan.partitions,
                TopicReplication::Fixed(plan.replication),
            )
        })
        .collect();
    let opts = AdminOptions::new()
        .operation_timeout(Some(timeout))
        .request_timeout(Some(timeout));
    let results = admin
        .create_topics(new.iter(), &opts)
        .await
        .map_err(|e| SinkError::Client(plan.kafka.redact(&e.to_string())))?;
    for r in results {
        match r {
            Ok(topic) => tracing::info!(topic, partitions = plan.partitions, "created topic"),
            Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => {
                tracing::debug!(topic, "topic already exists")
            }
            Err((topic, code)) => {
                return Err(SinkError::CreateTopic {
                    topic,
                    detail: format!("{code:?}"),
                })
            }
        }
    }
    Ok(())
}
