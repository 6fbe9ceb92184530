//! How the node divides this machine's cores, from its configuration: its
//! async runtime's threads and how long the engine holds tokens so that
//! several leave together. Here rather than with the configuration because
//! both follow the engine's thread count (`resolve_threads`).

use crate::config::NodeConfig;
use zavod_engine::llama::resolve_threads;

/// The automatic stream interval when inference takes every core: 20
/// updates a second still read as a smooth stream.
pub const AUTO_STREAM_INTERVAL_MS: u32 = 50;

/// Worker threads of the node's async runtime. Automatic (0) gives the
/// cores the model's CPU threads leave free, at least 1 and at most 4.
/// On a machine whose cores all run inference this is one thread: every
/// thread woken per streamed token preempts an inference thread, and
/// llama.cpp's threads wait for the slowest at each step. One runtime
/// thread instead of two halves those wake-ups (measured on 2 cores: 2.1
/// to 1.1 per token), though the decode-rate gain stays inside that
/// machine's noise.
pub fn runtime_threads(c: &NodeConfig) -> usize {
    if c.node.runtime_threads > 0 {
        return c.node.runtime_threads as usize;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let inference = if !c.model.serves_any() {
        0
    } else if c.model.gpu_layers > 0 {
        // With layers on the GPU the CPU threads mostly wait for it.
        1
    } else {
        resolve_threads(c.model.threads) as usize
    };
    cores.saturating_sub(inference).clamp(1, 4)
}

/// How long the engine may hold generated tokens so that several leave
/// in one wake-up of the node and the client. Automatic (unset): 0 (each
/// token at once) when the model leaves a core free or runs on a GPU;
/// [`AUTO_STREAM_INTERVAL_MS`] when its CPU threads take every core. There
/// each token's wake-ups preempt an inference thread mid-step while the
/// others wait for it at their next barrier; on 2 cores that cost 2-5%
/// of the decode rate, and holding tokens this long recovers most of it.
pub fn stream_interval_ms(c: &NodeConfig) -> u32 {
    if let Some(v) = c.model.stream_interval_ms {
        return v;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu_bound = c.model.gpu_layers == 0 && resolve_threads(c.model.threads) as usize >= cores;
    if cpu_bound {
        AUTO_STREAM_INTERVAL_MS
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Overrides;

    #[test]
    fn runtime_threads_leave_the_cores_to_inference() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut c = NodeConfig::default();
        // A routing-only node has every core for networking (up to 4).
        assert_eq!(runtime_threads(&c), cores.clamp(1, 4));
        // A CPU model on all cores leaves one thread for the rest.
        c.model.path = vec!["m.gguf".into()];
        assert_eq!(runtime_threads(&c), 1);
        c.model.threads = 1;
        assert_eq!(runtime_threads(&c), (cores - 1).clamp(1, 4));
        c.model.threads = 0;
        c.model.gpu_layers = 99;
        assert_eq!(runtime_threads(&c), (cores - 1).clamp(1, 4));
        c.apply(Overrides {
            runtime_threads: Some(3),
            ..Default::default()
        });
        assert_eq!(runtime_threads(&c), 3);
        c.node.runtime_threads = 1000;
        assert!(
            c.check()
                .expect_err("too many")
                .to_string()
                .contains("runtime_threads")
        );
        // The built-in profile names the key, so it parses.
        assert_eq!(
            NodeConfig::load(None)
                .expect("profile")
                .node
                .runtime_threads,
            0
        );
    }

    #[test]
    fn streams_are_paced_only_when_inference_takes_every_core() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut c = NodeConfig::default();
        c.model.path = vec!["m.gguf".into()];
        // threads = 0: every core runs the model.
        assert_eq!(stream_interval_ms(&c), AUTO_STREAM_INTERVAL_MS);
        c.model.gpu_layers = 99;
        assert_eq!(stream_interval_ms(&c), 0);
        c.model.gpu_layers = 0;
        if cores > 1 {
            c.model.threads = (cores - 1) as u32;
            assert_eq!(stream_interval_ms(&c), 0, "a core is free");
        }
        c.apply(Overrides {
            stream_interval_ms: Some(20),
            ..Default::default()
        });
        assert_eq!(stream_interval_ms(&c), 20);
        c.check().expect("valid");
        let e = NodeConfig::from_toml("[model]\nstream_interval_ms = 5000\n", "x.toml")
            .expect("parses")
            .check()
            .expect_err("too long");
        assert!(e.to_string().contains("model.stream_interval_ms"), "{e}");
    }
}
