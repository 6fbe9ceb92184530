//! GpuMonitor: samples the machine every `monitor.sample_interval_ms` —
//! VRAM, utilisation, temperature and power of each NVIDIA GPU through NVML
//! when the driver library loads, RAM and CPU through sysinfo always — and
//! hands each sample to the Router. On a machine without a GPU, NVML fails
//! to load once, which is logged, and sampling goes on with sysinfo alone.

use super::NodeShared;
use super::router::RouterMsg;
use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::sync::Arc;
use std::time::Duration;
use zavod_proto::mesh::capacity::{GpuSample, Resources};

pub(crate) struct GpuMonitor;

pub enum MonitorMsg {
    Tick,
    Latest(RpcReplyPort<Resources>),
}

impl ractor::Message for MonitorMsg {}

pub(crate) struct MonitorState {
    shared: Arc<NodeShared>,
    nvml: Option<Nvml>,
    sys: sysinfo::System,
    latest: Resources,
}

fn sample_gpus(nvml: &Nvml) -> Vec<GpuSample> {
    let count = nvml.device_count().unwrap_or(0);
    (0..count)
        .filter_map(|i| {
            let d = nvml.device_by_index(i).ok()?;
            let mem = d.memory_info().ok()?;
            Some(GpuSample {
                name: d.name().unwrap_or_else(|_| format!("gpu{i}")),
                vram_total_bytes: mem.total,
                vram_free_bytes: mem.free,
                utilization_percent: d.utilization_rates().map_or(0, |u| u.gpu),
                temperature_c: d.temperature(TemperatureSensor::Gpu).unwrap_or(0),
                power_milliwatts: d.power_usage().unwrap_or(0),
            })
        })
        .collect()
}

impl MonitorState {
    fn sample(&mut self) -> Resources {
        self.sys.refresh_memory();
        self.sys.refresh_cpu_usage();
        Resources {
            gpus: self.nvml.as_ref().map(sample_gpus).unwrap_or_default(),
            ram_total_bytes: self.sys.total_memory(),
            ram_free_bytes: self.sys.available_memory(),
            cpu_percent: self.sys.global_cpu_usage(),
            cpu_cores: u32::try_from(self.sys.cpus().len()).unwrap_or(0),
        }
    }
}

impl Actor for GpuMonitor {
    type Msg = MonitorMsg;
    type State = MonitorState;
    type Arguments = Arc<NodeShared>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        shared: Arc<NodeShared>,
    ) -> Result<Self::State, ActorProcessingErr> {
        let nvml = match Nvml::init() {
            Ok(n) => {
                tracing::info!(gpus = n.device_count().unwrap_or(0), "NVML loaded");
                Some(n)
            }
            Err(e) => {
                tracing::info!(reason = %e, "no NVIDIA GPU management library; sampling CPU and RAM only");
                None
            }
        };
        let mut sys = sysinfo::System::new();
        sys.refresh_cpu_usage();
        let period = Duration::from_millis(shared.config.monitor.sample_interval_ms);
        myself.send_interval(period, || MonitorMsg::Tick);
        let mut st = MonitorState {
            shared,
            nvml,
            sys,
            latest: Resources::default(),
        };
        st.latest = st.sample();
        Ok(st)
    }

    async fn post_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(r) = st.shared.directory.get().router {
            let _ = r.cast(RouterMsg::Resources(st.latest.clone()));
        }
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            MonitorMsg::Tick => {
                st.latest = st.sample();
                if let Some(r) = st.shared.directory.get().router {
                    let _ = r.cast(RouterMsg::Resources(st.latest.clone()));
                }
            }
            MonitorMsg::Latest(reply) => {
                let _ = reply.send(st.latest.clone());
            }
        }
        Ok(())
    }
}
