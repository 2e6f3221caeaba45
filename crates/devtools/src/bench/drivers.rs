//! What a benchmark mode runs: a task pod of this service (`stream`,
//! `batch`), the upstream algorithm (`serial`), or the I/O floor fed
//! directly (`floor`) or through JetStream (`floor-js`), each fed events
//! through [`Driver::submit`].

use std::fmt;
use std::time::Duration;

use async_nats::jetstream;
use prost::Message;
use serde::Serialize;
use tokio::task::JoinHandle;

use super::floor::{Floor, FloorJs};
use super::serial::Serial;
use super::{Bench, BenchError, setup};
use resonance_task::config::{Config, PushProtocolChoice};
use resonance_task::proto::PushEvent;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Serial,
    Stream,
    Batch,
    FloorJs,
    Floor,
}

impl Mode {
    pub const ALL: [Mode; 5] = [
        Mode::Serial,
        Mode::Stream,
        Mode::Batch,
        Mode::FloorJs,
        Mode::Floor,
    ];

    /// Its name on the command line and in the report's text.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Serial => "serial",
            Mode::Stream => "stream",
            Mode::Batch => "batch",
            Mode::FloorJs => "floor-js",
            Mode::Floor => "floor",
        }
    }

    /// Its key in the JSON report.
    pub fn key(self) -> &'static str {
        match self {
            Mode::FloorJs => "floor_js",
            m => m.as_str(),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

pub(crate) enum Driver {
    /// Events published on NATS for a consumer in this process.
    Published {
        mode: Mode,
        nats: async_nats::Client,
        topic: String,
        consumer: Box<Consumer>,
    },
    Floor(Floor),
}

pub(crate) enum Consumer {
    Pod {
        shutdown: tokio::sync::oneshot::Sender<()>,
        task: JoinHandle<Result<(), resonance_task::RunError>>,
    },
    Serial(Serial),
    FloorJs(FloorJs),
}

/// The pod configuration of a mode: its own subject, stream and durable,
/// so no mode sees another's events.
pub(crate) fn pod_config(base: &Config, mode: Mode) -> Config {
    let mut c = base.clone();
    c.consumer.topic = format!("resonance.bench.{}.v1", mode.key());
    c.consumer.stream = format!("BENCH_{}", mode.key().to_uppercase());
    c.consumer.queue_group = format!("bench-{mode}");
    c.gateway.push_protocol = match mode {
        Mode::Stream => PushProtocolChoice::PerUser,
        _ => PushProtocolChoice::Auto,
    };
    c
}

impl Driver {
    pub(crate) async fn start(mode: Mode, bench: &Bench) -> Result<Self, BenchError> {
        if mode == Mode::Floor {
            return Ok(Driver::Floor(Floor::start(bench).await?));
        }
        if mode == Mode::FloorJs {
            let config = pod_config(&bench.config, mode);
            let consumer = Consumer::FloorJs(FloorJs::start(bench, &config).await?);
            let nats = resonance_task::nats::connect(&config.nats, "resonance-task-bench")
                .await
                .map_err(setup)?;
            return Ok(Driver::Published {
                mode,
                nats,
                topic: config.consumer.topic,
                consumer: Box::new(consumer),
            });
        }
        Self::start_with(mode, pod_config(&bench.config, mode)).await
    }

    /// A `serial`, `stream` or `batch` consumer with this configuration.
    pub(crate) async fn start_with(mode: Mode, config: Config) -> Result<Self, BenchError> {
        let nats = resonance_task::nats::connect(&config.nats, "resonance-task-bench")
            .await
            .map_err(setup)?;
        let consumer = if mode == Mode::Serial {
            Consumer::Serial(Serial::start(&config).await?)
        } else {
            let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
            let pod_config = config.clone();
            let task = tokio::spawn(async move {
                resonance_task::run(pod_config, async {
                    let _ = stop.await;
                })
                .await
            });
            wait_consuming(&nats, &config).await?;
            Consumer::Pod { shutdown, task }
        };
        Ok(Driver::Published {
            mode,
            nats,
            topic: config.consumer.topic,
            consumer: Box::new(consumer),
        })
    }

    pub(crate) fn mode(&self) -> Mode {
        match self {
            Driver::Published { mode, .. } => *mode,
            Driver::Floor(_) => Mode::Floor,
        }
    }

    pub(crate) async fn submit(&self, event: PushEvent) -> Result<(), BenchError> {
        match self {
            Driver::Published { nats, topic, .. } => nats
                .publish(topic.clone(), event.encode_to_vec().into())
                .await
                .map_err(setup),
            Driver::Floor(floor) => {
                floor.submit(event).await;
                Ok(())
            }
        }
    }

    pub(crate) async fn flush(&self) -> Result<(), BenchError> {
        match self {
            Driver::Published { nats, .. } => nats.flush().await.map_err(setup),
            Driver::Floor(_) => Ok(()),
        }
    }

    pub(crate) async fn stop(self) -> Result<(), BenchError> {
        match self {
            Driver::Published { consumer, .. } => match *consumer {
                Consumer::Pod { shutdown, task } => {
                    let _ = shutdown.send(());
                    task.await.map_err(setup)?.map_err(setup)
                }
                Consumer::Serial(serial) => {
                    serial.stop().await;
                    Ok(())
                }
                Consumer::FloorJs(floor) => {
                    floor.stop().await;
                    Ok(())
                }
            },
            Driver::Floor(floor) => {
                floor.stop().await;
                Ok(())
            }
        }
    }
}

/// Waits until the pod has created its stream and durable consumer, so no
/// published event falls outside the stream.
pub(crate) async fn wait_consuming(
    nats: &async_nats::Client,
    config: &Config,
) -> Result<(), BenchError> {
    let js = jetstream::new(nats.clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(stream) = js.get_stream(&config.consumer.stream).await
            && stream
                .get_consumer::<jetstream::consumer::pull::Config>(&config.consumer.queue_group)
                .await
                .is_ok()
        {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(setup(format!(
                "the pod did not bind consumer {} on stream {} within 60 s",
                config.consumer.queue_group, config.consumer.stream
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
