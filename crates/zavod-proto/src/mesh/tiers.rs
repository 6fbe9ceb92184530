//! Which file of a model family a node loads: the best quantization that
//! fits its free memory (VRAM when it offloads, RAM otherwise) together
//! with the KV cache of its slots.
//!
//! The tiers are those of the design (after TitanCompute): Premium (Q8_0,
//! Q6_K), High (Q5_K_M, Q4_K_M), Good (IQ4_XS, Q3_K_L), Emergency (Q2_K,
//! IQ2_M). TitanCompute states them as memory thresholds for an 8B model
//! (8 GB and up, 6–8, 4–6, under 4); here they scale to the model by
//! measuring each file: a tier is open when its file, the KV cache and a
//! margin fit. Pure: the node passes in the files and the memory it saw.

use std::fmt;

/// Quality tiers, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tier {
    Premium,
    High,
    Good,
    Emergency,
}

impl Tier {
    pub fn name(self) -> &'static str {
        match self {
            Tier::Premium => "Premium",
            Tier::High => "High",
            Tier::Good => "Good",
            Tier::Emergency => "Emergency",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Quantizations from best to worst, each with its tier. Unquantized
/// files are Premium (they only fit where Q8_0 also would). Names not
/// listed have no tier and are chosen only when named.
const RANKED: [(&str, Tier); 24] = [
    ("F32", Tier::Premium),
    ("BF16", Tier::Premium),
    ("F16", Tier::Premium),
    ("Q8_0", Tier::Premium),
    ("Q6_K", Tier::Premium),
    ("Q5_K_M", Tier::High),
    ("Q5_1", Tier::High),
    ("Q5_K_S", Tier::High),
    ("Q5_0", Tier::High),
    ("Q4_K_M", Tier::High),
    ("Q4_K_S", Tier::High),
    ("Q4_1", Tier::High),
    ("IQ4_XS", Tier::Good),
    ("IQ4_NL", Tier::Good),
    ("Q4_0", Tier::Good),
    ("Q3_K_L", Tier::Good),
    ("IQ3_M", Tier::Good),
    ("Q3_K_M", Tier::Good),
    ("IQ3_S", Tier::Good),
    ("Q3_K_S", Tier::Emergency),
    ("Q2_K", Tier::Emergency),
    ("IQ2_M", Tier::Emergency),
    ("Q2_K_S", Tier::Emergency),
    ("IQ2_S", Tier::Emergency),
];

/// A quantization's tier, if it has one.
pub fn tier_of(quant: &str) -> Option<Tier> {
    RANKED
        .iter()
        .find(|(q, _)| q.eq_ignore_ascii_case(quant))
        .map(|(_, t)| *t)
}

/// Higher for better files of a model: what routing compares between
/// nodes serving the same model. 0 for quantizations with no tier.
pub fn quality(quant: &str) -> u8 {
    u8::try_from(RANKED.len() - rank(quant)).unwrap_or(0)
}

/// Rank in quality order (0 is best); unranked quantizations come last.
fn rank(quant: &str) -> usize {
    RANKED
        .iter()
        .position(|(q, _)| q.eq_ignore_ascii_case(quant))
        .unwrap_or(RANKED.len())
}

/// One file of a family.
#[derive(Debug, Clone, PartialEq)]
pub struct TierFile {
    pub quant: String,
    pub size_bytes: u64,
}

/// What the node needs besides the weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Room {
    /// Memory the node may use now.
    pub free_bytes: u64,
    /// The KV cache of all slots at full context.
    pub kv_bytes: u64,
}

/// Compute buffers and the allocator's slack, on top of weights and KV
/// cache: a tenth of the weights, and at least 64 MiB.
pub fn margin_bytes(size_bytes: u64) -> u64 {
    (size_bytes / 10).max(64 << 20)
}

/// The file a node loads and why.
#[derive(Debug, Clone, PartialEq)]
pub struct TierChoice {
    /// Index into the files given.
    pub index: usize,
    pub quant: String,
    pub tier: Option<Tier>,
    pub reason: String,
}

/// Why no file can be chosen.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TierError {
    #[error("the family has no files")]
    Empty,
    #[error("the family has no {0} file; it has {1}")]
    NoSuchQuant(String, String),
    #[error(
        "no file fits in {free} free: the smallest, {quant} ({size}), needs {need} with the KV \
         cache of the slots; free memory, use fewer slots or a shorter context, or name a file \
         with --quant"
    )]
    NothingFits {
        free: String,
        quant: String,
        size: String,
        need: String,
    },
}

fn mib(b: u64) -> String {
    if b >= 10 << 30 {
        format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{} MiB", b >> 20)
    }
}

/// Bytes a file needs loaded: weights, KV cache and margin.
pub fn need_bytes(file: &TierFile, kv_bytes: u64) -> u64 {
    file.size_bytes
        .saturating_add(kv_bytes)
        .saturating_add(margin_bytes(file.size_bytes))
}

/// The best file that fits `room`, or the one named by `forced` (which is
/// taken whether it fits or not: the operator has decided).
pub fn choose(
    files: &[TierFile],
    room: Room,
    forced: Option<&str>,
) -> Result<TierChoice, TierError> {
    if files.is_empty() {
        return Err(TierError::Empty);
    }
    if let Some(q) = forced {
        let index = files
            .iter()
            .position(|f| f.quant.eq_ignore_ascii_case(q))
            .ok_or_else(|| TierError::NoSuchQuant(q.to_string(), list(files)))?;
        return Ok(TierChoice {
            index,
            quant: files[index].quant.clone(),
            tier: tier_of(&files[index].quant),
            reason: format!("{} named with --quant", files[index].quant),
        });
    }
    let mut order: Vec<usize> = (0..files.len()).collect();
    // Best quality first; among files of one quantization, the smaller.
    order.sort_by_key(|&i| (rank(&files[i].quant), files[i].size_bytes, i));
    let fits = |i: usize| need_bytes(&files[i], room.kv_bytes) <= room.free_bytes;
    match order.iter().position(|&i| fits(i)) {
        Some(at) => {
            let index = order[at];
            let f = &files[index];
            let tier = tier_of(&f.quant);
            let mut reason = format!(
                "{} ({}) needs {} with the KV cache; {} free",
                f.quant,
                tier.map_or("no tier", Tier::name),
                mib(need_bytes(f, room.kv_bytes)),
                mib(room.free_bytes)
            );
            if let Some(&better) = order[..at].last() {
                let b = &files[better];
                reason.push_str(&format!(
                    "; {} would need {}",
                    b.quant,
                    mib(need_bytes(b, room.kv_bytes))
                ));
            }
            Ok(TierChoice {
                index,
                quant: f.quant.clone(),
                tier,
                reason,
            })
        }
        None => {
            let smallest = files
                .iter()
                .min_by_key(|f| f.size_bytes)
                .ok_or(TierError::Empty)?;
            Err(TierError::NothingFits {
                free: mib(room.free_bytes),
                quant: smallest.quant.clone(),
                size: mib(smallest.size_bytes),
                need: mib(need_bytes(smallest, room.kv_bytes)),
            })
        }
    }
}

fn list(files: &[TierFile]) -> String {
    files
        .iter()
        .map(|f| f.quant.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn family(files: &[(&str, u64)]) -> Vec<TierFile> {
        files
            .iter()
            .map(|(q, s)| TierFile {
                quant: (*q).into(),
                size_bytes: *s,
            })
            .collect()
    }

    /// An 8B model's files, sized as published.
    fn llama_8b() -> Vec<TierFile> {
        family(&[
            ("Q2_K", 3_180 * MIB),
            ("Q8_0", 8_540 * MIB),
            ("Q4_K_M", 4_920 * MIB),
            ("IQ4_XS", 4_450 * MIB),
            ("Q6_K", 6_600 * MIB),
        ])
    }

    #[test]
    fn the_best_file_that_fits_is_chosen_by_free_memory() {
        // (free, KV cache, expected quant, expected tier), for an 8B family:
        // TitanCompute's thresholds (8 / 6 / 4 GB) fall out of the sizes.
        let kv = 512 * MIB;
        let table = [
            (16 * GIB, kv, "Q8_0", Tier::Premium),
            (10 * GIB, kv, "Q8_0", Tier::Premium),
            (9 * GIB, kv, "Q6_K", Tier::Premium),
            (7 * GIB, kv, "Q4_K_M", Tier::High),
            (5_632 * MIB, kv, "IQ4_XS", Tier::Good),
            (4 * GIB, kv, "Q2_K", Tier::Emergency),
            // A bigger KV cache (more slots, longer context) pushes down a tier.
            (11 * GIB, 3 * GIB, "Q6_K", Tier::Premium),
            (10 * GIB, 3 * GIB, "Q4_K_M", Tier::High),
            (7 * GIB, 2 * GIB, "IQ4_XS", Tier::Good),
        ];
        for (free, kv_bytes, quant, tier) in table {
            let c = choose(
                &llama_8b(),
                Room {
                    free_bytes: free,
                    kv_bytes,
                },
                None,
            )
            .expect("fits");
            assert_eq!(c.quant, quant, "free {free} kv {kv_bytes}: {}", c.reason);
            assert_eq!(c.tier, Some(tier));
            assert_eq!(llama_8b()[c.index].quant, quant);
        }
    }

    #[test]
    fn tiers_scale_to_a_small_model() {
        // The development family: a 270M model's tiers open at a few
        // hundred MiB, not at gigabytes.
        let gemma = family(&[
            ("Q8_0", 279 * MIB),
            ("Q4_K_M", 241 * MIB),
            ("Q2_K", 225 * MIB),
        ]);
        let kv = 50 * MIB;
        let pick = |free| {
            choose(
                &gemma,
                Room {
                    free_bytes: free,
                    kv_bytes: kv,
                },
                None,
            )
        };
        assert_eq!(pick(4 * GIB).expect("fits").quant, "Q8_0");
        assert_eq!(pick(360 * MIB).expect("fits").quant, "Q4_K_M");
        assert_eq!(pick(340 * MIB).expect("fits").quant, "Q2_K");
        let none = pick(200 * MIB).expect_err("nothing fits");
        assert!(none.to_string().contains("smallest, Q2_K"), "{none}");
    }

    #[test]
    fn a_named_quant_is_taken_and_a_missing_one_is_named() {
        let room = Room {
            free_bytes: MIB,
            kv_bytes: 0,
        };
        let c = choose(&llama_8b(), room, Some("q4_k_m")).expect("named");
        assert_eq!(c.quant, "Q4_K_M");
        assert!(c.reason.contains("--quant"));
        let e = choose(&llama_8b(), room, Some("Q5_K_M")).expect_err("absent");
        assert!(e.to_string().contains("no Q5_K_M file"), "{e}");
        assert_eq!(choose(&[], room, None), Err(TierError::Empty));
    }

    #[test]
    fn the_reason_says_what_the_better_file_would_need() {
        let c = choose(
            &llama_8b(),
            Room {
                free_bytes: 7 * GIB,
                kv_bytes: 512 * MIB,
            },
            None,
        )
        .expect("fits");
        assert!(c.reason.contains("Q6_K would need"), "{}", c.reason);
        assert!(c.reason.contains("High"), "{}", c.reason);
    }

    #[test]
    fn every_tier_named_in_the_design_is_ranked() {
        for (q, t) in [
            ("Q8_0", Tier::Premium),
            ("Q6_K", Tier::Premium),
            ("Q5_K_M", Tier::High),
            ("Q4_K_M", Tier::High),
            ("IQ4_XS", Tier::Good),
            ("Q3_K_L", Tier::Good),
            ("Q2_K", Tier::Emergency),
            ("IQ2_M", Tier::Emergency),
        ] {
            assert_eq!(tier_of(q), Some(t), "{q}");
        }
        assert!(rank("Q8_0") < rank("Q4_K_M") && rank("Q4_K_M") < rank("Q2_K"));
        assert_eq!(tier_of("TQ1_0"), None);
    }
}
