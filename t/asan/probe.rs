//! The ASan self-check's probe (t/asan/run.sh), built like the module (rustc
//! -Zsanitizer=address, a cdylib without the sanitizer runtime) and loaded by a GCC-ASan
//! host, as the module is by nginx: each kind is one bad access that only the Rust
//! instrumentation can see, so a missing report means the module runs uninstrumented.
use std::hint::black_box;

static TABLE: [u8; 16] = [1; 16];

#[no_mangle]
pub extern "C" fn probe(kind: i32) -> u8 {
    match kind {
        // heap-use-after-free
        0 => {
            let p = Box::into_raw(Box::new([7u8; 64]));
            // SAFETY: none; the read after the free is the point.
            unsafe {
                drop(Box::from_raw(p));
                black_box((*black_box(p))[3])
            }
        }
        // heap-buffer-overflow
        1 => {
            let v = vec![1u8; 24];
            // SAFETY: none; one past the end.
            unsafe { *black_box(v.as_ptr()).add(black_box(24)) }
        }
        // global-buffer-overflow
        2 => unsafe { *black_box(TABLE.as_ptr()).add(black_box(16)) },
        // stack-buffer-overflow
        3 => {
            let a = [3u8; 8];
            // SAFETY: none; one past the end.
            unsafe { *black_box(a.as_ptr()).add(black_box(8)) }
        }
        _ => 0,
    }
}
