//! Tells the tests where nginx-sys built nginx, and marks the module as a dynamic module.
fn main() {
    // nginx-sys (links = "nginx") exports its build directory; with the `vendored`
    // feature the nginx binary it built lies there, and the integration tests run it.
    if let Ok(dir) = std::env::var("DEP_NGINX_BUILD_DIR") {
        println!("cargo:rustc-env=NGX_GPU_NGINX_BUILD_DIR={dir}");
    }
    // The module's undefined nginx symbols are resolved by the nginx binary at load time.
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-z,lazy");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
