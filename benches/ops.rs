fn main() {
    println!("benches: under construction");
}
