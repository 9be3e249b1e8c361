fn main() {
    println!("video-infinity: under construction");
}
