//! Model families: files made by `zavod model quantize`, read back by
//! `zavod model inspect` and `list`, and a node choosing the file that fits
//! the memory it is told it has.

use zavod_tests::{NodeProc, model_path, status_json, stderr, stdout, zavod};

fn run_ok(args: &[&str]) -> String {
    let o = zavod().args(args).output().expect("run zavod");
    assert!(o.status.success(), "zavod {args:?}: {}", stderr(&o));
    stdout(&o)
}

/// `GET /v1/models` with a bearer credential.
fn v1_models(http: &str, token: &str) -> serde_json::Value {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        reqwest::Client::new()
            .get(format!("{http}/v1/models"))
            .bearer_auth(token)
            .send()
            .await
            .expect("GET /v1/models")
            .json()
            .await
            .expect("JSON")
    })
}

/// The quantization of this node's own model, as its status reports it.
fn own_quant(node: &NodeProc) -> String {
    let s = status_json(&node.data_dir, &node.addr);
    let me = s["members"]
        .as_array()
        .expect("members")
        .iter()
        .find(|m| m["is_self"] == true)
        .expect("lists itself")
        .clone();
    me["models"][0]["quant"]
        .as_str()
        .expect("quant")
        .to_string()
}

#[test]
fn a_family_is_made_inspected_listed_and_the_file_that_fits_is_loaded() {
    let root = tempfile::tempdir().expect("tempdir");
    let fam = root.path().join("gemma-3-270m");
    std::fs::create_dir(&fam).expect("family dir");
    let src = model_path();
    let src = src.to_str().expect("utf8");
    // Names that say nothing: the quantization must come from the files.
    let (a, b) = (fam.join("weights-a.gguf"), fam.join("weights-b.gguf"));
    run_ok(&[
        "model",
        "quantize",
        src,
        "--type",
        "Q8_0",
        "--out",
        a.to_str().expect("utf8"),
    ]);
    run_ok(&[
        "model",
        "quantize",
        src,
        "--type",
        "q2_k",
        "--out",
        b.to_str().expect("utf8"),
    ]);
    std::os::unix::fs::symlink(&*model_path(), fam.join("weights-c.gguf")).expect("link");

    let j: serde_json::Value = serde_json::from_str(&run_ok(&[
        "model",
        "inspect",
        "--json",
        b.to_str().expect("utf8"),
    ]))
    .expect("inspect JSON");
    assert_eq!(j["quantization"], "Q2_K");
    assert_eq!(j["tier"], "Emergency");
    assert_eq!(j["architecture"], "gemma3");
    let params = j["parameters"].as_u64().expect("parameters");
    assert!((250_000_000..300_000_000).contains(&params), "{params}");

    let listed = run_ok(&["model", "list", root.path().to_str().expect("utf8")]);
    assert!(listed.contains("gemma-3-270m (3 files)"), "{listed}");
    for q in ["Q8_0", "Q4_K_M", "Q2_K"] {
        assert!(listed.contains(q), "{listed}");
    }

    // With 1 slot of 512 tokens the KV cache is 9 MiB; each file needs its
    // size + 64 MiB margin + that: Q8_0 about 351 MiB, Q4_K_M 314, Q2_K 299.
    let fam_s = fam.to_str().expect("utf8");
    let node = |free_mib: &str, dir: &str| {
        NodeProc::start(
            &root.path().join(dir),
            &[
                "--model",
                fam_s,
                "--slots",
                "1",
                "--context-tokens",
                "512",
                "--assume-free-memory-mib",
                free_mib,
            ],
        )
    };
    for (free, dir, want) in [
        ("4096", "big", "Q8_0"),
        ("330", "mid", "Q4_K_M"),
        ("305", "small", "Q2_K"),
    ] {
        let n = node(free, dir);
        assert!(
            n.stdout
                .iter()
                .any(|l| l.starts_with("model gemma-3-270m: chose") && l.contains(want)),
            "{free} MiB: {:#?}",
            n.stdout
        );
        assert_eq!(own_quant(&n), want, "{free} MiB free");
        // The mesh knows the model by its family's name.
        let o = zavod_tests::chat(
            &n.data_dir,
            &n.addr,
            &[
                "--prompt",
                "Hi",
                "--max-tokens",
                "2",
                "--model",
                "gemma-3-270m",
            ],
        );
        assert!(o.status.success(), "{}", stderr(&o));
    }

    // Too little memory for any file: the node says what it would need.
    let o = zavod()
        .args(["node", "--listen", "/ip4/127.0.0.1/tcp/0", "--data-dir"])
        .arg(root.path().join("tiny"))
        .args(["--model", fam_s, "--slots", "1", "--context-tokens", "512"])
        .args(["--assume-free-memory-mib", "200"])
        .output()
        .expect("run zavod node");
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("no file fits in 200 MiB free"),
        "{}",
        stderr(&o)
    );

    // --quant takes the named file whatever the memory.
    let forced = NodeProc::start(
        &root.path().join("forced"),
        &[
            "--model",
            fam_s,
            "--slots",
            "1",
            "--context-tokens",
            "512",
            "--quant",
            "Q8_0",
            "--assume-free-memory-mib",
            "1",
            "--http",
            "127.0.0.1:0",
        ],
    );
    assert_eq!(own_quant(&forced), "Q8_0");
    // /v1/models says which file was chosen and why.
    let token = zavod_tests::cap_issue(
        &root.path().join("forced"),
        &["--max-tokens", "100", "--ttl", "1h"],
    );
    let models = v1_models(forced.http.as_deref().expect("http"), &token);
    let m = &models["data"][0];
    assert_eq!(m["id"], "gemma-3-270m", "{models}");
    assert_eq!(m["quantization"], "Q8_0", "{models}");
    assert_eq!(m["tier"], "Premium", "{models}");
    assert!(
        m["selected_here"]
            .as_str()
            .is_some_and(|w| w.contains("--quant")),
        "{models}"
    );
}

#[test]
fn a_mesh_serves_two_models_by_name_through_a_third_node() {
    let root = tempfile::tempdir().expect("tempdir");
    let d = |n: &str| root.path().join(n);
    let gemma = model_path();
    let smol = zavod_tests::chat_model_path();
    let entry = NodeProc::start(&d("entry"), &[]);
    let token = zavod_tests::invite_for(&d("entry"), 4);
    let g = NodeProc::start(
        &d("g"),
        &["--join", &token, "--model", gemma.to_str().expect("utf8")],
    );
    let s = NodeProc::start(
        &d("s"),
        &["--join", &token, "--model", smol.to_str().expect("utf8")],
    );
    let both = zavod_tests::wait_until(std::time::Duration::from_secs(10), || {
        let st = status_json(&d("entry"), &entry.addr);
        [&g.peer_id, &s.peer_id]
            .iter()
            .all(|p| zavod_tests::member_state(&st, p).as_deref() == Some("alive"))
    });
    assert!(both.is_some(), "the entry never saw both model nodes");

    // Each model by name, through the entry, from the node that has it.
    let ask = |model: &str, prompt: &str| {
        zavod_tests::chat(
            &d("entry"),
            &entry.addr,
            &[
                "--model",
                model,
                "--prompt",
                prompt,
                "--temperature",
                "0",
                "--max-tokens",
                "16",
                "--verbose",
            ],
        )
    };
    let o = ask(
        "smollm2-135m-instruct-q4_1",
        "What is the capital of France?",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("Paris"), "{}", stdout(&o));
    assert_eq!(
        zavod_tests::served_by(&o).as_deref(),
        Some(s.peer_id.as_str())
    );
    let o = ask("gemma-3-270m-q4_k_m", "The sky is");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        zavod_tests::served_by(&o).as_deref(),
        Some(g.peer_id.as_str())
    );

    // The entry's status lists both models.
    let st = status_json(&d("entry"), &entry.addr);
    let names: Vec<String> = st["members"]
        .as_array()
        .expect("members")
        .iter()
        .flat_map(|m| m["models"].as_array().cloned().unwrap_or_default())
        .filter_map(|m| m["name"].as_str().map(String::from))
        .collect();
    assert!(
        names.contains(&"smollm2-135m-instruct-q4_1".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"gemma-3-270m-q4_k_m".to_string()),
        "{names:?}"
    );

    // A model nobody serves: the error lists what the mesh serves.
    let o = ask("llama-3-8b", "Hi");
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("llama-3-8b")
            && e.contains("gemma-3-270m-q4_k_m")
            && e.contains("smollm2-135m-instruct-q4_1"),
        "{e}"
    );
}

/// This node's own row of its status.
fn own_row(node: &NodeProc) -> serde_json::Value {
    let s = status_json(&node.data_dir, &node.addr);
    s["members"]
        .as_array()
        .expect("members")
        .iter()
        .find(|m| m["is_self"] == true)
        .expect("lists itself")
        .clone()
}

#[test]
fn one_node_serves_several_models_each_with_its_own_slots() {
    let root = tempfile::tempdir().expect("tempdir");
    let gemma = model_path();
    let smol = zavod_tests::chat_model_path();
    let (g, s) = (gemma.to_str().expect("utf8"), smol.to_str().expect("utf8"));
    // --model repeated.
    let node = NodeProc::start(
        &root.path().join("a"),
        &[
            "--model",
            g,
            "--model",
            s,
            "--slots",
            "2",
            "--http",
            "127.0.0.1:0",
        ],
    );
    let me = own_row(&node);
    let models = me["models"].as_array().expect("models");
    let names: Vec<&str> = models.iter().filter_map(|m| m["name"].as_str()).collect();
    assert_eq!(
        names,
        ["gemma-3-270m-q4_k_m", "smollm2-135m-instruct-q4_1"],
        "{me}"
    );
    for m in models {
        assert_eq!(m["slots_total"], 2, "{me}");
    }
    assert_eq!(me["slots_total"], 4, "the node's slots are the sum: {me}");

    // Each model answers on this one node.
    let ask = |model: &str, prompt: &str| {
        zavod_tests::chat(
            &node.data_dir,
            &node.addr,
            &[
                "--model",
                model,
                "--prompt",
                prompt,
                "--temperature",
                "0",
                "--max-tokens",
                "16",
            ],
        )
    };
    let o = ask(
        "smollm2-135m-instruct-q4_1",
        "What is the capital of France?",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("Paris"), "{}", stdout(&o));
    let o = ask("gemma-3-270m-q4_k_m", "The sky is");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stdout(&o).trim().is_empty());

    // The OpenAI API lists both.
    let http = node.http.clone().expect("http");
    let cred = zavod_tests::cap_issue(&node.data_dir, &["--max-tokens", "100", "--ttl", "1h"]);
    let models = v1_models(&http, &cred);
    let ids: Vec<&str> = models["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert!(
        ids.contains(&"gemma-3-270m-q4_k_m") && ids.contains(&"smollm2-135m-instruct-q4_1"),
        "{models}"
    );

    // A models folder: every model in it.
    let dir = root.path().join("models");
    std::fs::create_dir(&dir).expect("models dir");
    std::os::unix::fs::symlink(&*gemma, dir.join("gemma-3-270m-q4_k_m.gguf")).expect("link");
    std::os::unix::fs::symlink(&*smol, dir.join("smollm2-135m-instruct-q4_1.gguf")).expect("link");
    let b = NodeProc::start(
        &root.path().join("b"),
        &["--models-dir", dir.to_str().expect("utf8"), "--slots", "1"],
    );
    let me = own_row(&b);
    assert_eq!(me["models"].as_array().map(Vec::len), Some(2), "{me}");

    // The same model twice is refused, naming it.
    let o = zavod()
        .args(["node", "--listen", "/ip4/127.0.0.1/tcp/0", "--data-dir"])
        .arg(root.path().join("c"))
        .args(["--model", g, "--models-dir", dir.to_str().expect("utf8")])
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("gemma-3-270m-q4_k_m") && stderr(&o).contains("once"),
        "{}",
        stderr(&o)
    );
}
