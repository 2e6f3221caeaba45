//! The JetStream streams this service creates (input, dead letters,
//! offline notices, notice dead letters), replicated and placed as
//! `consumer.stream_replicas` and `consumer.stream_placement_tags` say.
//!
//! A stream that exists already keeps its data; when its replica count or
//! placement tags differ from the configuration it is updated (JetStream
//! moves the data to the new peers) and the change is logged.

use async_nats::jetstream::{self, stream};

use crate::config::ConsumerConfig;

/// How a stream is replicated and where its replicas may go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replication {
    pub replicas: usize,
    /// Servers a replica may be placed on must carry every tag.
    pub tags: Vec<String>,
}

impl Default for Replication {
    fn default() -> Self {
        Self {
            replicas: 1,
            tags: Vec::new(),
        }
    }
}

impl Replication {
    pub fn of(cfg: &ConsumerConfig) -> Self {
        Self {
            replicas: cfg.stream_replicas,
            tags: cfg.stream_placement_tags.clone(),
        }
    }

    fn placement(&self) -> Option<stream::Placement> {
        (!self.tags.is_empty()).then(|| stream::Placement {
            cluster: None,
            tags: self.tags.clone(),
        })
    }

    fn applies_to(&self, config: &stream::Config) -> bool {
        let tags = config
            .placement
            .as_ref()
            .map(|p| p.tags.as_slice())
            .unwrap_or_default();
        config.num_replicas.max(1) == self.replicas && tags == self.tags.as_slice()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(
        "stream {stream}: consumer.stream_replicas is {replicas}{tags}, which the NATS servers cannot place ({cause}); use at most as many replicas as the cluster has JetStream servers (1 on a single server)"
    )]
    Unplaceable {
        stream: String,
        replicas: usize,
        tags: String,
        cause: crate::BoxError,
    },
    #[error("stream {stream}: {cause}")]
    Other {
        stream: String,
        cause: crate::BoxError,
    },
}

impl StreamError {
    fn new(stream: &str, replication: &Replication, cause: crate::BoxError) -> Self {
        use jetstream::ErrorCode;
        // Updates fail with the same error type as creation.
        let code = cause
            .downcast_ref::<jetstream::context::CreateStreamError>()
            .and_then(|e| match e.kind() {
                jetstream::context::CreateStreamErrorKind::JetStream(js) => Some(js.error_code()),
                _ => None,
            });
        let unplaceable = [
            ErrorCode::INSUFFICIENT_RESOURCES,
            ErrorCode::STREAM_REPLICAS_NOT_SUPPORTED,
            ErrorCode::CLUSTER_NO_PEERS,
        ];
        if code.is_some_and(|c| unplaceable.contains(&c)) {
            let tags = if replication.tags.is_empty() {
                String::new()
            } else {
                format!(
                    " on servers tagged {:?} (consumer.stream_placement_tags)",
                    replication.tags
                )
            };
            Self::Unplaceable {
                stream: stream.to_string(),
                replicas: replication.replicas,
                tags,
                cause,
            }
        } else {
            Self::Other {
                stream: stream.to_string(),
                cause,
            }
        }
    }
}

impl crate::refusal::Refusal for StreamError {
    fn refused(&self) -> bool {
        crate::refusal::refused(self)
    }
}

/// Creates `config`'s stream replicated as `replication` asks, or brings
/// an existing one to that replication.
pub async fn ensure(
    js: &jetstream::Context,
    mut config: stream::Config,
    replication: &Replication,
) -> Result<stream::Stream, StreamError> {
    let name = config.name.clone();
    let err = |cause: crate::BoxError| StreamError::new(&name, replication, cause);
    config.num_replicas = replication.replicas;
    config.placement = replication.placement();
    let mut stream = js
        .get_or_create_stream(config)
        .await
        .map_err(|e| err(e.into()))?;
    let current = stream
        .info()
        .await
        .map_err(|e| err(e.into()))?
        .config
        .clone();
    if !replication.applies_to(&current) {
        let mut wanted = current.clone();
        wanted.num_replicas = replication.replicas;
        wanted.placement = replication.placement();
        js.update_stream(&wanted).await.map_err(|e| err(e.into()))?;
        tracing::info!(
            stream = %name,
            from = current.num_replicas.max(1),
            to = replication.replicas,
            tags = ?replication.tags,
            "stream replication changed"
        );
        stream = js.get_stream(&name).await.map_err(|e| err(e.into()))?;
    }
    Ok(stream)
}
