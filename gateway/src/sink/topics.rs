//! Start-up topic check: the three topics must exist, or be created when allowed.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;

use super::{SinkConfig, SinkError};

/// Names of topics that exist on the cluster (blocking metadata request).
fn existing_topics(cfg: &SinkConfig, timeout: Duration) -> Result<Vec<String>, SinkError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers);
    for (k, v) in &cfg.kafka_options {
        // Security and networking options apply to this probe too; producer-only ones would
        // make a consumer config invalid, so pass only the common prefixes.
        if k.starts_with("security.")
            || k.starts_with("sasl.")
            || k.starts_with("ssl.")
            || k.starts_with("socket.")
            || k.starts_with("broker.")
        {
            c.set(k, v);
        }
    }
    let consumer: BaseConsumer = c.create()?;
    let md = consumer
        .fetch_metadata(None, timeout)
        .map_err(|e| SinkError::Unreachable {
            brokers: cfg.brokers.clone(),
            detail: e.to_string(),
        })?;
    Ok(md
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| t.name().to_owned())
        .collect())
}

/// Ensures the audio and events topics exist; creates missing ones when `create_topics`.
pub async fn ensure_topics(cfg: &SinkConfig, timeout: Duration) -> Result<(), SinkError> {
    let cfg2 = cfg.clone();
    let existing = tokio::task::spawn_blocking(move || existing_topics(&cfg2, timeout))
        .await
        .map_err(|e| SinkError::Unreachable {
            brokers: cfg.brokers.clone(),
            detail: e.to_string(),
        })??;
    let mut wanted: Vec<String> = cfg.audio_topics().to_vec();
    wanted.push(cfg.events_topic());
    let missing: Vec<String> = wanted
        .into_iter()
        .filter(|t| !existing.contains(t))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !cfg.create_topics {
        return Err(SinkError::MissingTopics(missing));
    }
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &cfg.brokers)
        .create()?;
    let new: Vec<NewTopic<'_>> = missing
        .iter()
        .map(|t| {
            NewTopic::new(
                t,
                cfg.topic_partitions,
                TopicReplication::Fixed(cfg.topic_replication),
            )
        })
        .collect();
    let opts = AdminOptions::new()
        .operation_timeout(Some(timeout))
        .request_timeout(Some(timeout));
    let results = admin.create_topics(new.iter(), &opts).await?;
    for r in results {
        match r {
            Ok(topic) => tracing::info!(topic, partitions = cfg.topic_partitions, "created topic"),
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
