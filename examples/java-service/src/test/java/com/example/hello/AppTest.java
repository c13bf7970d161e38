package com.example.hello;

import static org.junit.jupiter.api.Assertions.assertEquals;

import org.junit.jupiter.api.Test;

class AppTest {
    @Test
    void greetsByNameOrTheWorld() {
        assertEquals("Hello, kiln!", App.greeting("kiln"));
        assertEquals("Hello, world!", App.greeting(""));
        assertEquals("Hello, world!", App.greeting(null));
    }
}
