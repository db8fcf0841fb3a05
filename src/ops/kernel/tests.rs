//! The kernel op without a GPU: declarations and their errors, argument typing, the
//! entry-point check on PTX, and how a batch is described to the kernel and cut back
//! (lengths, capacities, statuses), against hand-built outputs.

use super::*;
use crate::engine::batch::Piece;
use crate::engine::job::{Body, Segment};
use crate::ops::Item;

fn decl(params: &[&str]) -> Decl {
    declare("blur", "/conf/kernels/blur.cu", "// src".into(), params).unwrap()
}

#[test]
fn a_declaration_has_sane_defaults_and_takes_every_parameter() {
    let d = decl(&[]);
    assert_eq!(d.entry, "blur");
    assert_eq!(d.output, OutputSize::Same);
    assert_eq!(d.block, 256);
    assert!(d.args.is_empty());
    assert_eq!(&*d.content_type, "application/octet-stream");
    assert_eq!(d.program.name, "/conf/kernels/blur.cu");

    let d = decl(&[
        "entry=blur_rgba",
        "output=x2",
        "block=128",
        "options=-DRADIUS=2 --use_fast_math",
        "args=width:u32,height:u32 sigma:f32",
        "type=image/x-rgba",
    ]);
    assert_eq!(d.entry, "blur_rgba");
    assert_eq!(d.output, OutputSize::Times(2));
    assert_eq!(d.block, 128);
    assert_eq!(d.program.options, ["-DRADIUS=2", "--use_fast_math"]);
    let args: Vec<(&str, ArgType)> = d.args.iter().map(|a| (a.name.as_str(), a.ty)).collect();
    assert_eq!(
        args,
        [
            ("width", ArgType::U32),
            ("height", ArgType::U32),
            ("sigma", ArgType::F32)
        ]
    );
    assert_eq!(&*d.content_type, "image/x-rgba");
    assert_eq!(decl(&["output=4096"]).output, OutputSize::Fixed(4096));
    assert_eq!(decl(&["output=64k"]).output, OutputSize::Fixed(65536));
    // The options are part of the program's identity: other options, another compile.
    assert_ne!(
        decl(&["options=-DA"]).program.key,
        decl(&["options=-DB"]).program.key
    );
}

#[test]
fn bad_declarations_say_what_is_wrong() {
    let err = |params: &[&str]| declare("k", "k.cu", String::new(), params).unwrap_err();
    assert!(err(&["colour=red"]).contains("unknown parameter \"colour\""));
    assert!(err(&["fast"]).contains("invalid parameter \"fast\""));
    assert!(err(&["output=x0"]).contains("invalid output \"x0\""));
    assert!(err(&["output=x65"]).contains("invalid output \"x65\""));
    assert!(err(&["output=2g"]).contains("invalid output \"2g\""));
    assert!(err(&["block=0"]).contains("invalid block \"0\""));
    assert!(err(&["block=2048"]).contains("invalid block \"2048\""));
    assert!(err(&["args=w"]).contains("invalid argument \"w\""));
    assert!(err(&["args=w:u16"]).contains("invalid type \"u16\" of argument \"w\""));
    assert!(err(&["args=w:u32,w:i32"]).contains("argument name \"w\""));
    assert!(err(&["entry=not-a-name"]).contains("invalid entry"));
    let e = declare("bad name", "k.cu", String::new(), &[]).unwrap_err();
    assert!(e.contains("invalid kernel name"), "{e}");
}

#[test]
fn location_values_are_checked_against_the_declared_arguments() {
    let d = decl(&["args=width:u32,height:u32,sigma:f32"]);
    let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert!(d.check_values(&v(&["$arg_w", "$arg_h", "1.5"])).is_ok());
    let e = d.check_values(&v(&["$arg_w"])).unwrap_err();
    assert_eq!(
        e,
        "kernel \"blur\" takes 3 arguments (width:u32 height:u32 sigma:f32), got 1: \"height\" is missing"
    );
    let e = d.check_values(&v(&["1", "2", "3", "4"])).unwrap_err();
    assert!(e.contains("got 4: \"4\" is one too many"), "{e}");
    let e = d.check_values(&v(&["-1", "$arg_h", "1"])).unwrap_err();
    assert_eq!(
        e,
        "argument \"width\" (u32) of kernel \"blur\": \"-1\" is not an unsigned integer in range"
    );
    let e = d.check_values(&v(&["1", "2", "soft"])).unwrap_err();
    assert!(
        e.contains("argument \"sigma\" (f32)") && e.contains("is not a finite number"),
        "{e}"
    );
}

#[test]
fn request_values_are_typed_or_refused_naming_the_argument() {
    let d = decl(&["args=a:i32,b:u32,c:i64,d:u64,e:f32,f:f64"]);
    let vals = |s: &[&str]| s.iter().map(|x| x.as_bytes().to_vec()).collect::<Vec<_>>();
    assert_eq!(
        d.parse_values(&vals(&[
            "-5",
            "7",
            "-9000000000",
            "18446744073709551615",
            "0.5",
            "1e300"
        ]))
        .unwrap(),
        [
            Value::I64(-5),
            Value::U64(7),
            Value::I64(-9_000_000_000),
            Value::U64(u64::MAX),
            Value::F64(0.5),
            Value::F64(1e300)
        ]
    );
    for (bad, name) in [
        (["2147483648", "0", "0", "0", "0", "0"], "a"),
        (["0", "4294967296", "0", "0", "0", "0"], "b"),
        (["0", "0", "x", "0", "0", "0"], "c"),
        (["0", "0", "0", "-1", "0", "0"], "d"),
        (["0", "0", "0", "0", "1e39", "0"], "e"),
        (["0", "0", "0", "0", "0", "NaN"], "f"),
        (["0", "", "0", "0", "0", "0"], "b"),
    ] {
        let e = d.parse_values(&vals(&bad)).unwrap_err();
        assert!(
            e.starts_with(&format!("argument \"{name}\" (")),
            "{bad:?}: {e}"
        );
    }
}

#[test]
fn the_entry_point_must_exist_and_take_one_batch() {
    let d = decl(&["entry=blur_rgba"]);
    let ptx = |text: &'static str| move |_: &Program| Some(Arc::<str>::from(text));
    let good = ".visible .entry blur_rgba(\n\t.param .align 8 .b8 blur_rgba_param_0[88]\n)\n";
    assert!(d.check_compiled(&ptx(good)).is_ok());
    let e = d
        .check_compiled(&ptx(
            ".visible .entry blur(\n\t.param .align 8 .b8 blur_param_0[88]\n)\n",
        ))
        .unwrap_err();
    assert_eq!(
        e,
        "kernel \"blur\": no kernel function \"blur_rgba\" in /conf/kernels/blur.cu (found: blur); a kernel is extern \"C\" __global__, or name it with entry="
    );
    let e = d
        .check_compiled(&ptx(
            ".visible .entry blur_rgba(\n\t.param .u64 blur_rgba_param_0,\n\t.param .u32 blur_rgba_param_1\n)\n",
        ))
        .unwrap_err();
    assert!(
        e.contains("must take one ngx_gpu_batch by value (88 bytes), it takes 2 parameters"),
        "{e}"
    );
    // Without NVRTC there is no PTX to check: nothing to say.
    assert!(d.check_compiled(&|_| None).is_ok());
    assert_eq!(size_of::<BatchParam>(), BATCH_PARAM_BYTES);
}

fn body(bytes: &[u8]) -> Body {
    let mut b = Body::default();
    b.push(Segment::Memory(bytes.to_vec()));
    b
}

/// Lays out, packs and describes a batch of `bodies` with one u32 argument each, the way
/// the launch does, and returns what the kernel would see.
fn batch(output: &str, bodies: &[Vec<u8>]) -> (Layout, Vec<u8>, Vec<u8>) {
    let d = Arc::new(decl(&[&format!("output={output}"), "args=k:u32"]));
    let pieces: Vec<Piece> = bodies
        .iter()
        .enumerate()
        .map(|(i, b)| Piece {
            id: i as u64,
            offset: 0,
            len: b.len() as u64,
            index: 0,
            whole: true,
        })
        .collect();
    let bodies: Vec<Body> = bodies.iter().map(|b| body(b)).collect();
    let params: Vec<Params> = (0..bodies.len())
        .map(|i| Params(vec![Value::U64(100 + i as u64)]))
        .collect();
    let items: Vec<Item> = pieces
        .iter()
        .zip(&bodies)
        .zip(&params)
        .map(|((piece, body), params)| Item {
            piece,
            body,
            params,
            decoded: None,
        })
        .collect();
    // The same layout and packing the device uses (they need no loaded function).
    let layout = layout_for(&d, &items);
    let mut desc = vec![0xee; layout.desc_len];
    let mut data = vec![0xee; layout.data_len];
    assert!(pack_for(&d, &items, &layout, &mut desc, &mut data).is_empty());
    (layout, desc, data)
}

fn word(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

#[test]
fn a_batch_is_described_as_the_abi_says() {
    let bodies = vec![vec![1u8; 5], vec![], vec![7u8; 70]];
    let (layout, desc, data) = batch("x2", &bodies);
    let dl = DescLayout::new(3, 1);
    for (i, b) in bodies.iter().enumerate() {
        let off = word(&desc, dl.in_off + 8 * i) as usize;
        assert_eq!(word(&desc, dl.in_len + 8 * i), b.len() as u64);
        assert_eq!(&data[off..off + b.len()], &b[..], "body {i} at its offset");
        assert_eq!(off % 64, 0, "bodies start 64-byte aligned");
        assert_eq!(word(&desc, dl.out_cap + 8 * i), 2 * b.len() as u64);
        assert_eq!(word(&desc, dl.out_off + 8 * i) % 64, 0);
        assert_eq!(
            word(&desc, dl.args + 8 * i),
            100 + i as u64,
            "argument k of request {i}"
        );
        // Lengths start at the capacity, statuses at 0.
        assert_eq!(word(&desc, dl.init + 8 * i), 2 * b.len() as u64);
    }
    assert!(desc[dl.init + 24..dl.desc_len()].iter().all(|&b| b == 0));
    // Regions of the output do not overlap and fit.
    let mut end = 0;
    for p in &layout.items {
        assert!(p.out_off >= end);
        end = p.out_off + p.out_cap;
    }
    assert!(dl.regions as u64 + end <= layout.out_len as u64);
    let param = dl.param(0x1000, 0x20000, 200, 0x30000);
    assert_eq!(
        (
            param.n,
            param.nargs,
            param.in_len,
            param.out,
            param.status,
            param.args
        ),
        (
            3,
            1,
            0x1000 + 24,
            0x30000 + dl.regions as u64,
            0x30000 + 24,
            0x1000 + 96
        )
    );
}

#[test]
fn results_are_cut_to_their_length_and_checked() {
    let bodies = vec![vec![1u8; 10], vec![2u8; 10], vec![3u8; 10], vec![4u8; 10]];
    let (layout, desc, _) = batch("same", &bodies);
    let dl = DescLayout::new(4, 1);
    // What the device returns: the header copied from the descriptors, then what the
    // kernel wrote.
    let mut out = vec![0u8; layout.out_len];
    out[..dl.header].copy_from_slice(&desc[dl.init..dl.desc_len()]);
    for (i, p) in layout.items.iter().enumerate() {
        let at = dl.regions + p.out_off as usize;
        out[at..at + 10].fill(0x40 + i as u8);
    }
    // Request 1 wrote 3 bytes; request 2 was rejected with code 7; request 3 claims more
    // than its capacity.
    out[8..16].copy_from_slice(&3u64.to_le_bytes());
    out[dl.n * 8 + 8..dl.n * 8 + 12].copy_from_slice(&7i32.to_le_bytes());
    out[24..32].copy_from_slice(&11u64.to_le_bytes());
    assert_eq!(cut("k", &dl, &layout, 0, &out).unwrap(), &[0x40; 10]);
    assert_eq!(cut("k", &dl, &layout, 1, &out).unwrap(), &[0x41; 3]);
    assert_eq!(
        cut("k", &dl, &layout, 2, &out).unwrap_err(),
        JobError::BadInput("kernel \"k\" rejected the request (code 7)".into())
    );
    assert!(matches!(
        cut("k", &dl, &layout, 3, &out).unwrap_err(),
        JobError::Internal(m) if m.contains("reported 11 bytes") && m.contains("capacity is 10")
    ));
}
